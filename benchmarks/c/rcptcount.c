/*
 * rcptcount -- reference C milter for the pymilterkit benchmarks.
 *
 * The "recipient counter": counts the envelope recipients of each message
 * (reset at MAIL) and at end of message adds the header
 *     X-Rcpt-Count: <n>
 * It registers envfrom, envrcpt, eom and close (close frees the per-connection
 * state kept with smfi_setpriv) and declares only SMFIF_ADDHDRS.  All other
 * stages are negotiated away by libmilter because their callbacks are NULL.
 *
 * Usage: rcptcount [-n] [-t] SOCKETSPEC      e.g. rcptcount unix:/tmp/x/m.sock
 *
 *   -n  "no-reply" variant: also registers xxfi_negotiate and requests
 *       SMFIP_NR_MAIL|SMFIP_NR_RCPT, so envfrom/envrcpt return SMFIS_NOREPLY
 *       and the MTA does not wait for them.  This is what pymilter negotiates
 *       for methods decorated with @Milter.noreply.
 *   -t  the TCP recipe pymilterkit's runner uses, for an inet:PORT@IPV4 spec:
 *       the listening socket is opened here with TCP_NODELAY (accepted sockets
 *       inherit it on Linux) and handed to libmilter as fd:N (Debian's
 *       libmilter), and the DATA stage is registered and answered CONTINUE
 *       (Postfix otherwise sends DATA's macros as a packet nobody answers,
 *       and the end of message waits ~40 ms behind it).  Without -t an inet
 *       milter stalls ~40 ms per message through Postfix, like every
 *       libmilter milter.
 *
 * libmilter handles SIGTERM/SIGHUP (smfi_stop) and SIGINT itself; smfi_main
 * returns after a stop and the program exits 0.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <libmilter/mfapi.h>

struct rc_priv {
	unsigned long nrcpt; /* recipients of the current message */
	int noreply;         /* NR_MAIL|NR_RCPT negotiated for this connection */
};

static int opt_noreply;

static struct rc_priv *get_priv(SMFICTX *ctx)
{
	struct rc_priv *p = smfi_getpriv(ctx);

	if (p == NULL) {
		p = calloc(1, sizeof(*p));
		if (p == NULL)
			return NULL;
		if (smfi_setpriv(ctx, p) != MI_SUCCESS) {
			free(p);
			return NULL;
		}
	}
	return p;
}

static sfsistat rc_negotiate(SMFICTX *ctx, unsigned long f0, unsigned long f1,
			     unsigned long f2, unsigned long f3,
			     unsigned long *pf0, unsigned long *pf1,
			     unsigned long *pf2, unsigned long *pf3)
{
	struct rc_priv *p = get_priv(ctx);
	const unsigned long nr = SMFIP_NR_MAIL | SMFIP_NR_RCPT;

	(void)f2;
	(void)f3;
	if (p == NULL || (f0 & SMFIF_ADDHDRS) == 0)
		return SMFIS_REJECT; /* aborts the session */
	*pf0 = SMFIF_ADDHDRS;
	/* *pf1 is pre-filled with the NO* bits of the NULL callbacks: OR into it */
	p->noreply = (f1 & nr) == nr;
	if (p->noreply)
		*pf1 |= nr;
	*pf2 = 0;
	*pf3 = 0;
	return SMFIS_CONTINUE;
}

static sfsistat rc_envfrom(SMFICTX *ctx, char **argv)
{
	struct rc_priv *p = get_priv(ctx);

	(void)argv;
	if (p == NULL)
		return SMFIS_TEMPFAIL;
	p->nrcpt = 0;
	return p->noreply ? SMFIS_NOREPLY : SMFIS_CONTINUE;
}

static sfsistat rc_envrcpt(SMFICTX *ctx, char **argv)
{
	struct rc_priv *p = get_priv(ctx);

	(void)argv;
	if (p == NULL)
		return SMFIS_TEMPFAIL;
	p->nrcpt++;
	return p->noreply ? SMFIS_NOREPLY : SMFIS_CONTINUE;
}

static sfsistat rc_eom(SMFICTX *ctx)
{
	struct rc_priv *p = get_priv(ctx);
	char buf[32];

	if (p == NULL)
		return SMFIS_TEMPFAIL;
	snprintf(buf, sizeof(buf), "%lu", p->nrcpt);
	p->nrcpt = 0;
	if (smfi_addheader(ctx, "X-Rcpt-Count", buf) != MI_SUCCESS)
		return SMFIS_TEMPFAIL;
	return SMFIS_CONTINUE;
}

static sfsistat rc_close(SMFICTX *ctx)
{
	struct rc_priv *p = smfi_getpriv(ctx);

	if (p != NULL) {
		smfi_setpriv(ctx, NULL);
		free(p);
	}
	return SMFIS_CONTINUE;
}

static sfsistat rc_data(SMFICTX *ctx)
{
	(void)ctx;
	return SMFIS_CONTINUE;
}

static void usage(const char *prog)
{
	fprintf(stderr, "usage: %s [-n] [-t] SOCKETSPEC   (e.g. unix:/tmp/x/m.sock, inet:9999@127.0.0.1)\n",
		prog);
	exit(2);
}

/* -t: listen on inet:PORT@IPV4 with TCP_NODELAY; returns "fd:N" in buf, or NULL */
static const char *tcp_listener(const char *spec, char *buf, size_t len)
{
	struct sockaddr_in sin;
	const char *at;
	char *end;
	long port;
	int fd, one = 1;

	if (strncmp(spec, "inet:", 5) != 0 || (at = strchr(spec, '@')) == NULL)
		return NULL;
	port = strtol(spec + 5, &end, 10);
	if (end != at || port <= 0 || port > 65535)
		return NULL;
	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_port = htons((unsigned short)port);
	if (inet_pton(AF_INET, at + 1, &sin.sin_addr) != 1)
		return NULL;
	fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0 ||
	    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
	    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0 ||
	    bind(fd, (struct sockaddr *)&sin, sizeof(sin)) < 0 || listen(fd, 128) < 0) {
		perror("rcptcount: -t listener");
		return NULL;
	}
	snprintf(buf, len, "fd:%d", fd);
	return buf;
}

int main(int argc, char **argv)
{
	struct smfiDesc desc;
	const char *conn;
	char fdspec[32];
	int c, opt_tcp = 0;

	while ((c = getopt(argc, argv, "nt")) != -1) {
		switch (c) {
		case 'n':
			opt_noreply = 1;
			break;
		case 't':
			opt_tcp = 1;
			break;
		default:
			usage(argv[0]);
		}
	}
	if (optind != argc - 1)
		usage(argv[0]);

	memset(&desc, 0, sizeof(desc));
	desc.xxfi_name = "rcptcount";
	desc.xxfi_version = SMFI_VERSION;
	desc.xxfi_flags = SMFIF_ADDHDRS;
	desc.xxfi_envfrom = rc_envfrom;
	desc.xxfi_envrcpt = rc_envrcpt;
	desc.xxfi_eom = rc_eom;
	desc.xxfi_close = rc_close;
	if (opt_noreply)
		desc.xxfi_negotiate = rc_negotiate;
	conn = argv[optind];
	if (opt_tcp) {
		desc.xxfi_data = rc_data;
		conn = tcp_listener(argv[optind], fdspec, sizeof(fdspec));
		if (conn == NULL) {
			fprintf(stderr, "rcptcount: -t needs inet:PORT@IPV4, not %s\n", argv[optind]);
			return 2;
		}
	}

	if (smfi_setconn((char *)conn) != MI_SUCCESS) {
		fprintf(stderr, "rcptcount: smfi_setconn(%s) failed\n", conn);
		return 1;
	}
	if (smfi_register(desc) != MI_SUCCESS) {
		fprintf(stderr, "rcptcount: smfi_register failed\n");
		return 1;
	}
	if (smfi_opensocket(1) != MI_SUCCESS) {
		fprintf(stderr, "rcptcount: smfi_opensocket(%s) failed\n", argv[optind]);
		return 1;
	}
	return smfi_main() == MI_SUCCESS ? 0 : 1;
}
