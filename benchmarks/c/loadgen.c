/*
 * loadgen -- MTA-side load generator for the milter wire protocol (version 6).
 *
 * Part of the pymilterkit benchmarks.  Each thread opens one connection to
 * the milter (unix socket, or TCP on 127.0.0.1 / ::1 only), negotiates
 * (offering every action 0x1FF and every protocol bit 0x1FFFFF) and sends
 * messages the way Postfix does:
 *
 *     [CONNECT, HELO once per connection]
 *     per message: MAIL, RCPT x n, DATA, headers, EOH, BODY chunks, EOM, ABORT
 *
 * Stages the milter negotiated away (SMFIP_NO*) are not sent; for stages with
 * an SMFIP_NR_* bit no reply is awaited.  Packets that need no reply are
 * queued and go out in one writev() together with the next packet that does
 * (the ABORT after a message travels with the next message's first command).
 *
 * Every reply is verified: every awaited reply before EOM must be `c`; the
 * EOM response must contain exactly one `h` packet "X-Rcpt-Count" = number of
 * recipients, no other modification, and end with `c`.  Anything else is a
 * failure; the exit status is 1 if any message failed.
 *
 * Latency: from the first command of a message to the final EOM reply.
 * Output: one JSON line on stdout.  Diagnostics go to stderr.
 *
 * Run `loadgen -h` for the options.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <libmilter/mfdef.h>

#define PROT_VERSION 6
#define OFFER_ACTIONS 0x1FFUL
#define OFFER_PROTOCOL 0x1FFFFFUL
#define MAX_PACKET 65535       /* MILTER_MAX_DATA_SIZE: cmd + data */
#define MAX_BODY_CHUNK 65534   /* data bytes of a body packet (cmd byte + data <= 65535) */
#define MAX_RCPTS 10000
#define MAX_CONNS 1024
#define MAX_BODY (64L * 1024 * 1024)
#define MAX_EOM_PACKETS 1000   /* bound on packets read for one EOM response */
#define MAX_CONSEC_ERRORS 3    /* connection errors in a row before a thread gives up */
#define IOV_BATCH 512
#define RBUF_SIZE (MAX_PACKET + 4 + 4096)
#define HEADER_NAME "X-Rcpt-Count"
#define ACT_ADDHDRS 0x01UL       /* SMFIF_ADDHDRS (mfapi.h) */

/* ---------------------------------------------------------------- options */

static const char *opt_sock;
static int opt_conns = 1;
static long opt_messages = 10000;
static int opt_messages_set;
static double opt_duration;             /* 0: run -n messages */
static int opt_rcpts = 3;
static long opt_body = 1024;
static long opt_per_conn;               /* 0: unlimited messages per connection */
static int opt_timeout = 10;
static int opt_verbose;
static int opt_macros;                  /* send Postfix-like macros */
static long opt_spin_us;                /* busy-poll for a reply this long before blocking */

/* ---------------------------------------------------------------- helpers */

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fputs("loadgen: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(2);
}

static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static int log_budget = 20; /* only the first few problems are printed */

static void warnmsg(const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&log_lock);
	if (log_budget > 0) {
		log_budget--;
		va_start(ap, fmt);
		fputs("loadgen: ", stderr);
		vfprintf(stderr, fmt, ap);
		fputc('\n', stderr);
		va_end(ap);
		if (log_budget == 0)
			fputs("loadgen: (further messages suppressed)\n", stderr);
	}
	pthread_mutex_unlock(&log_lock);
}

/* A prebuilt packet: 4-byte length, command byte, data. */
struct pkt {
	unsigned char *buf;
	size_t len;
};

static struct pkt mkpkt(char cmd, const void *data, size_t dlen)
{
	struct pkt p;
	uint32_t n = htonl((uint32_t)(dlen + 1));

	if (dlen + 1 > MAX_PACKET)
		die("internal: packet too large");
	p.len = 5 + dlen;
	p.buf = malloc(p.len);
	if (p.buf == NULL)
		die("out of memory");
	memcpy(p.buf, &n, 4);
	p.buf[4] = (unsigned char)cmd;
	if (dlen)
		memcpy(p.buf + 5, data, dlen);
	return p;
}

/* data made of NUL-terminated strings, given as a NULL-terminated list */
static struct pkt mkpkt_strs(char cmd, ...)
{
	char buf[4096];
	size_t off = 0;
	const char *s;
	va_list ap;

	va_start(ap, cmd);
	while ((s = va_arg(ap, const char *)) != NULL) {
		size_t l = strlen(s) + 1;

		if (off + l > sizeof(buf))
			die("internal: string packet too large");
		memcpy(buf + off, s, l);
		off += l;
	}
	va_end(ap);
	return mkpkt(cmd, buf, off);
}

/* ------------------------------------------------------ the static message */

/* Packets are the same for every message, built once and shared read-only. */
static struct pkt p_optneg, p_connect, p_helo, p_mail, p_data, p_eoh, p_eom,
	p_abort, p_quit;
static struct pkt *p_rcpt;      /* opt_rcpts */
static struct pkt *p_hdr;       /* n_hdr */
static int n_hdr;
static struct pkt *p_body;      /* n_body chunks */
static int n_body;
/* optional macro packets (no reply), sent before the stage they belong to */
static struct pkt m_connect, m_helo, m_mail, *m_rcpt, m_data, m_eoh, m_eom;

static void build_packets(void)
{
	unsigned char neg[12];
	uint32_t v;
	char rbuf[64];
	int i;

	v = htonl(PROT_VERSION);
	memcpy(neg, &v, 4);
	v = htonl((uint32_t)OFFER_ACTIONS);
	memcpy(neg + 4, &v, 4);
	v = htonl((uint32_t)OFFER_PROTOCOL);
	memcpy(neg + 8, &v, 4);
	p_optneg = mkpkt(SMFIC_OPTNEG, neg, sizeof(neg));

	{
		/* hostname NUL, family '4', port (u16 BE), address NUL */
		unsigned char cb[64];
		size_t off = 0;
		uint16_t port = htons(40000);

		memcpy(cb + off, "client.example.net", 19);
		off += 19;
		cb[off++] = '4';
		memcpy(cb + off, &port, 2);
		off += 2;
		memcpy(cb + off, "192.0.2.10", 11);
		off += 11;
		p_connect = mkpkt(SMFIC_CONNECT, cb, off);
	}
	p_helo = mkpkt_strs(SMFIC_HELO, "client.example.net", (char *)NULL);
	p_mail = mkpkt_strs(SMFIC_MAIL, "<sender@example.net>", "SIZE=1000", (char *)NULL);
	p_rcpt = calloc((size_t)opt_rcpts, sizeof(*p_rcpt));
	m_rcpt = calloc((size_t)opt_rcpts, sizeof(*m_rcpt));
	if (p_rcpt == NULL || m_rcpt == NULL)
		die("out of memory");
	for (i = 0; i < opt_rcpts; i++) {
		snprintf(rbuf, sizeof(rbuf), "<rcpt%d@example.org>", i + 1);
		p_rcpt[i] = mkpkt_strs(SMFIC_RCPT, rbuf, (char *)NULL);
		snprintf(rbuf, sizeof(rbuf), "rcpt%d@example.org", i + 1);
		/* macro packet: stage letter, then name/value pairs */
		m_rcpt[i] = mkpkt_strs(SMFIC_MACRO, "R", "i", "4QUEUEID1",
				       "{rcpt_addr}", rbuf, "{rcpt_host}", "",
				       "{rcpt_mailer}", "smtp", (char *)NULL);
		/* the NUL mkpkt_strs puts after the stage byte "R" is removed
		 * by fix_macros() */
	}
	p_data = mkpkt(SMFIC_DATA, NULL, 0);
	{
		static const char *hdrs[][2] = {
			{ "From", "Sender <sender@example.net>" },
			{ "To", "rcpt1@example.org" },
			{ "Subject", "pymilterkit benchmark message" },
			{ "Date", "Mon, 1 Jan 2024 00:00:00 +0000" },
			{ "Message-ID", "<bench.1@example.net>" },
		};
		n_hdr = (int)(sizeof(hdrs) / sizeof(hdrs[0]));
		p_hdr = calloc((size_t)n_hdr, sizeof(*p_hdr));
		if (p_hdr == NULL)
			die("out of memory");
		for (i = 0; i < n_hdr; i++)
			p_hdr[i] = mkpkt_strs(SMFIC_HEADER, hdrs[i][0], hdrs[i][1], (char *)NULL);
	}
	p_eoh = mkpkt(SMFIC_EOH, NULL, 0);
	{
		/* body: lines of 'x' terminated by CRLF, opt_body bytes in total */
		unsigned char *body = malloc((size_t)opt_body + 1);
		long off = 0, j;

		if (body == NULL)
			die("out of memory");
		for (j = 0; j < opt_body; j++)
			body[j] = (j % 78 == 76) ? '\r' : (j % 78 == 77) ? '\n' : 'x';
		n_body = (int)((opt_body + MAX_BODY_CHUNK - 1) / MAX_BODY_CHUNK);
		p_body = calloc((size_t)(n_body ? n_body : 1), sizeof(*p_body));
		if (p_body == NULL)
			die("out of memory");
		for (i = 0; i < n_body; i++) {
			long l = opt_body - off;

			if (l > MAX_BODY_CHUNK)
				l = MAX_BODY_CHUNK;
			p_body[i] = mkpkt(SMFIC_BODY, body + off, (size_t)l);
			off += l;
		}
		free(body);
	}
	p_eom = mkpkt(SMFIC_BODYEOB, NULL, 0);
	p_abort = mkpkt(SMFIC_ABORT, NULL, 0);
	p_quit = mkpkt(SMFIC_QUIT, NULL, 0);

	/* Postfix-like default macros (milter_*_macros in Postfix 3.7) */
	m_connect = mkpkt_strs(SMFIC_MACRO, "C", "j", "mx.example.com",
			       "{daemon_name}", "smtpd", "{daemon_addr}", "127.0.0.1",
			       "v", "Postfix 3.7.11", "_", "client.example.net [192.0.2.10]",
			       (char *)NULL);
	m_helo = mkpkt_strs(SMFIC_MACRO, "H", (char *)NULL);
	m_mail = mkpkt_strs(SMFIC_MACRO, "M", "{mail_addr}", "sender@example.net",
			    "{mail_host}", "example.net", "{mail_mailer}", "smtp",
			    (char *)NULL);
	m_data = mkpkt_strs(SMFIC_MACRO, "T", "i", "4QUEUEID1", (char *)NULL);
	m_eoh = mkpkt_strs(SMFIC_MACRO, "N", "i", "4QUEUEID1", (char *)NULL);
	m_eom = mkpkt_strs(SMFIC_MACRO, "E", "i", "4QUEUEID1", (char *)NULL);
}

/*
 * The macro packets above were built with mkpkt_strs, which NUL-terminates
 * the stage letter too.  On the wire a macro packet is: cmd 'D', one byte
 * with the stage command, then name NUL value NUL pairs -- so drop the NUL
 * after the stage byte.
 */
static void fix_macro(struct pkt *p)
{
	uint32_t n;

	if (p->len < 7)
		return;
	memmove(p->buf + 6, p->buf + 7, p->len - 7);
	p->len--;
	n = htonl((uint32_t)(p->len - 4));
	memcpy(p->buf, &n, 4);
}

static void fix_macros(void)
{
	int i;

	fix_macro(&m_connect);
	fix_macro(&m_helo);
	fix_macro(&m_mail);
	for (i = 0; i < opt_rcpts; i++)
		fix_macro(&m_rcpt[i]);
	fix_macro(&m_data);
	fix_macro(&m_eoh);
	fix_macro(&m_eom);
}

/* ------------------------------------------------------------- connection */

struct conn {
	int fd;
	unsigned long actions;  /* negotiated by the milter */
	unsigned long pflags;
	struct iovec iov[IOV_BATCH];
	int niov;
	unsigned char *rbuf;    /* buffered reader */
	size_t rlen, roff;
	/* last packet read */
	char rcmd;
	unsigned char *rdata;
	size_t rdlen;
};

static int sock_family;
static struct sockaddr_storage sock_addr;
static socklen_t sock_addrlen;

static void parse_sockspec(const char *spec)
{
	memset(&sock_addr, 0, sizeof(sock_addr));
	if (strncmp(spec, "unix:", 5) == 0 || strncmp(spec, "local:", 6) == 0 || spec[0] == '/') {
		const char *path = spec[0] == '/' ? spec : strchr(spec, ':') + 1;
		struct sockaddr_un *un = (struct sockaddr_un *)&sock_addr;

		if (strlen(path) >= sizeof(un->sun_path))
			die("unix socket path too long: %s", path);
		un->sun_family = AF_UNIX;
		strcpy(un->sun_path, path);
		sock_family = AF_UNIX;
		sock_addrlen = sizeof(*un);
	} else if (strncmp(spec, "inet:", 5) == 0 || strncmp(spec, "inet6:", 6) == 0) {
		int six = spec[4] == '6';
		const char *rest = strchr(spec, ':') + 1;
		char *end;
		long port = strtol(rest, &end, 10);
		const char *host;

		if (end == rest || port <= 0 || port > 65535)
			die("bad port in %s", spec);
		if (*end == '@')
			host = end + 1;
		else if (*end == '\0')
			host = six ? "::1" : "127.0.0.1";
		else
			die("bad socket spec %s (want inet:PORT@HOST)", spec);
		if (strcmp(host, "localhost") == 0)
			host = six ? "::1" : "127.0.0.1";
		/* load stays on this machine: only the loopback addresses */
		if (strcmp(host, "127.0.0.1") == 0) {
			struct sockaddr_in *in = (struct sockaddr_in *)&sock_addr;

			in->sin_family = AF_INET;
			in->sin_port = htons((uint16_t)port);
			inet_pton(AF_INET, host, &in->sin_addr);
			sock_family = AF_INET;
			sock_addrlen = sizeof(*in);
		} else if (strcmp(host, "::1") == 0 || strcmp(host, "[::1]") == 0) {
			struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&sock_addr;

			in6->sin6_family = AF_INET6;
			in6->sin6_port = htons((uint16_t)port);
			inet_pton(AF_INET6, "::1", &in6->sin6_addr);
			sock_family = AF_INET6;
			sock_addrlen = sizeof(*in6);
		} else {
			die("refusing host %s: only 127.0.0.1, ::1 or localhost", host);
		}
	} else {
		die("bad socket spec %s (want unix:/path or inet:PORT@127.0.0.1)", spec);
	}
}

static void conn_close(struct conn *c)
{
	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
	c->niov = 0;
	c->rlen = c->roff = 0;
}

/* queue a packet; it goes out with the next flush */
static int q(struct conn *c, const struct pkt *p);

static int flush(struct conn *c)
{
	struct iovec *iov = c->iov;
	int n = c->niov;
	int rounds = 0;

	while (n > 0) {
		ssize_t w = writev(c->fd, iov, n);

		if (w < 0) {
			if (errno == EINTR && ++rounds < 100)
				continue;
			warnmsg("write: %s", errno == EAGAIN ? "timeout" : strerror(errno));
			return -1;
		}
		if (++rounds > 1000000)
			return -1;
		while (n > 0 && (size_t)w >= iov->iov_len) {
			w -= (ssize_t)iov->iov_len;
			iov++;
			n--;
		}
		if (n > 0 && w > 0) {
			iov->iov_base = (char *)iov->iov_base + w;
			iov->iov_len -= (size_t)w;
		}
	}
	c->niov = 0;
	return 0;
}

static int q(struct conn *c, const struct pkt *p)
{
	if (c->niov == IOV_BATCH && flush(c) < 0)
		return -1;
	c->iov[c->niov].iov_base = p->buf;
	c->iov[c->niov].iov_len = p->len;
	c->niov++;
	return 0;
}

/* read one packet into c->rcmd / c->rdata / c->rdlen; -1 on error/timeout */
static int rd(struct conn *c)
{
	uint32_t n;
	size_t need;
	int rounds = 0;

	for (;;) {
		size_t avail = c->rlen - c->roff;

		if (avail >= 4) {
			memcpy(&n, c->rbuf + c->roff, 4);
			n = ntohl(n);
			if (n < 1 || n > MAX_PACKET) {
				warnmsg("bad reply length %u", n);
				return -1;
			}
			need = 4 + (size_t)n;
			if (avail >= need) {
				c->rcmd = (char)c->rbuf[c->roff + 4];
				c->rdata = c->rbuf + c->roff + 5;
				c->rdlen = n - 1;
				c->roff += need;
				return 0;
			}
		}
		/* compact, then read more */
		if (c->roff > 0) {
			memmove(c->rbuf, c->rbuf + c->roff, avail);
			c->rlen = avail;
			c->roff = 0;
		}
		if (++rounds > 100000) {
			warnmsg("reply never completed");
			return -1;
		}
		{
			ssize_t r = -1;

			if (opt_spin_us > 0) {
				/* busy-poll briefly before blocking: saves the
				 * cross-CPU wake-up when the reply comes quickly */
				double until = now() + opt_spin_us / 1e6;

				do
					r = recv(c->fd, c->rbuf + c->rlen, RBUF_SIZE - c->rlen,
						 MSG_DONTWAIT);
				while (r < 0 && errno == EAGAIN && now() < until);
			}
			if (r < 0)
				r = read(c->fd, c->rbuf + c->rlen, RBUF_SIZE - c->rlen);

			if (r == 0) {
				warnmsg("milter closed the connection");
				return -1;
			}
			if (r < 0) {
				if (errno == EINTR)
					continue;
				warnmsg("read: %s", (errno == EAGAIN || errno == EWOULDBLOCK) ?
					"timeout" : strerror(errno));
				return -1;
			}
			c->rlen += (size_t)r;
		}
	}
}

/* flush the queue (which must end with a packet that wants a reply), read the
 * reply skipping progress packets.  Returns 0 with the reply in c->r*. */
static int flush_and_reply(struct conn *c)
{
	int i;

	if (flush(c) < 0)
		return -1;
	for (i = 0; i < MAX_EOM_PACKETS; i++) {
		if (rd(c) < 0)
			return -1;
		if (c->rcmd != SMFIR_PROGRESS)
			return 0;
	}
	return -1;
}

static int conn_open(struct conn *c)
{
	struct timeval tv;
	int one = 1;
	uint32_t v[3];

	c->fd = socket(sock_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c->fd < 0) {
		warnmsg("socket: %s", strerror(errno));
		return -1;
	}
	tv.tv_sec = opt_timeout;
	tv.tv_usec = 0;
	setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	if (sock_family != AF_UNIX)
		setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(c->fd, (struct sockaddr *)&sock_addr, sock_addrlen) < 0) {
		warnmsg("connect %s: %s", opt_sock, strerror(errno));
		conn_close(c);
		return -1;
	}
	c->niov = 0;
	c->rlen = c->roff = 0;

	/* option negotiation */
	if (q(c, &p_optneg) < 0 || flush_and_reply(c) < 0)
		goto fail;
	if (c->rcmd != SMFIC_OPTNEG || c->rdlen < 12) {
		warnmsg("bad OPTNEG reply '%c' len %zu", c->rcmd, c->rdlen);
		goto fail;
	}
	memcpy(v, c->rdata, 12);
	if (ntohl(v[0]) < 2 || ntohl(v[0]) > PROT_VERSION) {
		warnmsg("milter answered protocol version %u", ntohl(v[0]));
		goto fail;
	}
	c->actions = ntohl(v[1]);
	c->pflags = ntohl(v[2]);
	if ((c->actions & ~OFFER_ACTIONS) || (c->pflags & ~OFFER_PROTOCOL)) {
		warnmsg("milter requested unoffered actions 0x%lx / protocol 0x%lx",
			c->actions, c->pflags);
		goto fail;
	}
	if (!(c->actions & ACT_ADDHDRS)) {
		warnmsg("milter did not request SMFIF_ADDHDRS (actions 0x%lx)", c->actions);
		goto fail;
	}

	/* connection-level stages */
	if (opt_macros && !(c->pflags & SMFIP_NOCONNECT) && q(c, &m_connect) < 0)
		goto fail;
	if (!(c->pflags & SMFIP_NOCONNECT)) {
		if (q(c, &p_connect) < 0)
			goto fail;
		if (!(c->pflags & SMFIP_NR_CONN)) {
			if (flush_and_reply(c) < 0)
				goto fail;
			if (c->rcmd != SMFIR_CONTINUE) {
				warnmsg("connect reply '%c'", c->rcmd);
				goto fail;
			}
		}
	}
	if (!(c->pflags & SMFIP_NOHELO)) {
		if (opt_macros && q(c, &m_helo) < 0)
			goto fail;
		if (q(c, &p_helo) < 0)
			goto fail;
		if (!(c->pflags & SMFIP_NR_HELO)) {
			if (flush_and_reply(c) < 0)
				goto fail;
			if (c->rcmd != SMFIR_CONTINUE) {
				warnmsg("helo reply '%c'", c->rcmd);
				goto fail;
			}
		}
	}
	return 0;
fail:
	conn_close(c);
	return -1;
}

static void conn_quit(struct conn *c)
{
	if (c->fd < 0)
		return;
	if (q(c, &p_quit) == 0)
		(void)flush(c);
	conn_close(c);
}

/*
 * Send one stage: queue its packet; if the stage wants a reply, flush and
 * check it.  Returns 0 ok, 1 message-level failure (unexpected reply; the
 * connection is still in sync), -1 connection-level error.
 */
static int stage(struct conn *c, const struct pkt *p, unsigned long nr_bit,
		 const char *what, int *skipped)
{
	if (q(c, p) < 0)
		return -1;
	if (c->pflags & nr_bit)
		return 0;
	if (flush_and_reply(c) < 0)
		return -1;
	if (c->rcmd == SMFIR_CONTINUE)
		return 0;
	if (skipped != NULL && c->rcmd == SMFIR_SKIP) {
		*skipped = 1;
		return 0;
	}
	warnmsg("%s: unexpected reply '%c'", what, c->rcmd);
	return 1;
}

/* one message; returns 0 ok, 1 failure (connection still usable), -1 error */
static int message(struct conn *c)
{
	const unsigned long pf = c->pflags;
	int i, r, nh = 0, bad = 0, skipped = 0;
	char want[32];

	if (!(pf & SMFIP_NOMAIL)) {
		if (opt_macros && q(c, &m_mail) < 0)
			return -1;
		if ((r = stage(c, &p_mail, SMFIP_NR_MAIL, "MAIL", NULL)) != 0)
			return r;
	}
	if (!(pf & SMFIP_NORCPT)) {
		for (i = 0; i < opt_rcpts; i++) {
			if (opt_macros && q(c, &m_rcpt[i]) < 0)
				return -1;
			if ((r = stage(c, &p_rcpt[i], SMFIP_NR_RCPT, "RCPT", NULL)) != 0)
				return r;
		}
	}
	if (!(pf & SMFIP_NODATA)) {
		if (opt_macros && q(c, &m_data) < 0)
			return -1;
		if ((r = stage(c, &p_data, SMFIP_NR_DATA, "DATA", NULL)) != 0)
			return r;
	}
	if (!(pf & SMFIP_NOHDRS)) {
		for (i = 0; i < n_hdr; i++)
			if ((r = stage(c, &p_hdr[i], SMFIP_NR_HDR, "HEADER", NULL)) != 0)
				return r;
	}
	if (!(pf & SMFIP_NOEOH)) {
		if (opt_macros && q(c, &m_eoh) < 0)
			return -1;
		if ((r = stage(c, &p_eoh, SMFIP_NR_EOH, "EOH", NULL)) != 0)
			return r;
	}
	if (!(pf & SMFIP_NOBODY)) {
		for (i = 0; i < n_body && !skipped; i++)
			if ((r = stage(c, &p_body[i], SMFIP_NR_BODY, "BODY",
				       (pf & SMFIP_SKIP) ? &skipped : NULL)) != 0)
				return r;
	}
	if (opt_macros && q(c, &m_eom) < 0)
		return -1;
	if (q(c, &p_eom) < 0 || flush(c) < 0)
		return -1;

	/* EOM response: modifications, then a final verdict */
	snprintf(want, sizeof(want), "%d", (pf & SMFIP_NORCPT) ? 0 : opt_rcpts);
	for (i = 0; i < MAX_EOM_PACKETS; i++) {
		if (rd(c) < 0)
			return -1;
		switch (c->rcmd) {
		case SMFIR_PROGRESS:
			continue;
		case SMFIR_ADDHEADER: {
			const char *name = (const char *)c->rdata;
			size_t nl = strnlen(name, c->rdlen);
			const char *val;
			size_t vl;

			nh++;
			if (nl >= c->rdlen) {
				warnmsg("EOM: malformed 'h' packet");
				bad = 1;
				continue;
			}
			val = name + nl + 1;
			vl = strnlen(val, c->rdlen - nl - 1);
			if (vl + nl + 2 != c->rdlen || strcmp(name, HEADER_NAME) != 0 ||
			    strcmp(val, want) != 0) {
				warnmsg("EOM: got header '%.*s' = '%.*s', want %s = '%s'",
					(int)nl, name, (int)vl, val, HEADER_NAME, want);
				bad = 1;
			}
			continue;
		}
		case SMFIR_CONTINUE:
			if (nh != 1) {
				warnmsg("EOM: %d 'h' packets, want exactly 1", nh);
				bad = 1;
			}
			return bad;
		case SMFIR_ACCEPT: case SMFIR_REJECT: case SMFIR_TEMPFAIL:
		case SMFIR_DISCARD: case SMFIR_REPLYCODE: case SMFIR_SHUTDOWN:
		case SMFIR_CONN_FAIL:
			warnmsg("EOM: final reply '%c', want 'c'", c->rcmd);
			return 1;
		default:
			warnmsg("EOM: unexpected modification '%c'", c->rcmd);
			bad = 1;
			continue;
		}
	}
	warnmsg("EOM: no final reply after %d packets", MAX_EOM_PACKETS);
	return -1;
}

/* ----------------------------------------------------------------- threads */

struct worker {
	pthread_t tid;
	int idx;
	long quota;             /* messages to send (count mode), or cap */
	long done, failures, conn_errors;
	double *lat;            /* seconds per message */
	long nlat, caplat;
	int ready_ok;
	struct conn c;
};

static pthread_barrier_t start_barrier, go_barrier;
static double t_start, t_deadline;
static unsigned long neg_actions, neg_pflags;
static pthread_mutex_t neg_lock = PTHREAD_MUTEX_INITIALIZER;

static void add_lat(struct worker *w, double s)
{
	if (w->nlat == w->caplat) {
		long ncap = w->caplat ? w->caplat * 2 : 65536;
		double *n = realloc(w->lat, (size_t)ncap * sizeof(double));

		if (n == NULL)
			return; /* keep counting, drop the sample */
		w->lat = n;
		w->caplat = ncap;
	}
	w->lat[w->nlat++] = s;
}

static void *run_worker(void *arg)
{
	struct worker *w = arg;
	struct conn *c = &w->c;
	long on_conn = 0;
	int consec = 0;

	c->fd = -1;
	c->rbuf = malloc(RBUF_SIZE);
	if (c->rbuf == NULL)
		die("out of memory");
	/* connect and negotiate before the clock starts */
	w->ready_ok = conn_open(c) == 0;
	if (w->ready_ok) {
		pthread_mutex_lock(&neg_lock);
		neg_actions = c->actions;
		neg_pflags = c->pflags;
		pthread_mutex_unlock(&neg_lock);
	}
	pthread_barrier_wait(&start_barrier);
	pthread_barrier_wait(&go_barrier);
	if (!w->ready_ok) {
		w->conn_errors++;
		w->failures += opt_duration > 0 ? 0 : w->quota;
		w->done += opt_duration > 0 ? 0 : w->quota;
		return NULL;
	}

	while (w->done < w->quota) {
		double t0, t1;
		int r;

		if (opt_duration > 0 && now() >= t_deadline)
			break;
		if (c->fd < 0 || (opt_per_conn > 0 && on_conn >= opt_per_conn)) {
			conn_quit(c);
			if (conn_open(c) < 0) {
				w->conn_errors++;
				if (++consec >= MAX_CONSEC_ERRORS)
					break;
				continue;
			}
			on_conn = 0;
		}
		t0 = now();
		r = message(c);
		t1 = now();
		w->done++;
		on_conn++;
		if (r == 0) {
			consec = 0;
			add_lat(w, t1 - t0);
		} else {
			w->failures++;
			add_lat(w, t1 - t0);
		}
		if (r < 0) {
			w->conn_errors++;
			conn_close(c);
			if (++consec >= MAX_CONSEC_ERRORS)
				break;
			continue;
		}
		/* like Postfix: ABORT after every transaction (no reply); it goes
		 * out together with the next command */
		if (q(c, &p_abort) < 0) {
			conn_close(c);
			continue;
		}
	}
	if (opt_duration <= 0 && w->done < w->quota) {
		/* gave up: the rest counts as failed */
		w->failures += w->quota - w->done;
		w->done = w->quota;
	}
	conn_quit(c);
	return NULL;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static double pct(const double *v, long n, double p)
{
	long i;

	if (n == 0)
		return 0;
	i = (long)(p * (double)n + 0.5) - 1;
	if (i < 0)
		i = 0;
	if (i >= n)
		i = n - 1;
	return v[i];
}

static void usage(void)
{
	fprintf(stderr,
		"usage: loadgen -s SOCKSPEC [options]\n"
		"  -s SPEC   unix:/path, inet:PORT@127.0.0.1, inet6:PORT@::1 (loopback only)\n"
		"  -c N      concurrent connections, one thread each (default 1, max %d)\n"
		"  -n N      total messages (default 10000); with -d: upper bound\n"
		"  -d SEC    run for SEC seconds instead of a fixed message count\n"
		"  -r N      recipients per message (default 3)\n"
		"  -b BYTES  body size (default 1024), sent in <= %d-byte chunks\n"
		"  -m N      messages per connection, then QUIT and reconnect (default: unlimited)\n"
		"  -t SEC    socket read/write timeout (default 10)\n"
		"  -M        send Postfix-like macros (D packets) before the stages\n"
		"  -S USEC   busy-poll up to USEC microseconds for each reply before\n"
		"            blocking in read() (default 0: always block)\n"
		"  -v        print the negotiation result to stderr\n"
		"Output: one JSON line on stdout; exit 1 if any message failed.\n",
		MAX_CONNS, MAX_BODY_CHUNK);
	exit(2);
}

int main(int argc, char **argv)
{
	struct worker *ws;
	struct rusage ru;
	double elapsed, *all;
	long total = 0, fails = 0, cerr = 0, nlat = 0, k;
	int i, ch;

	while ((ch = getopt(argc, argv, "s:c:n:d:r:b:m:t:S:Mvh")) != -1) {
		switch (ch) {
		case 's': opt_sock = optarg; break;
		case 'c': opt_conns = atoi(optarg); break;
		case 'n': opt_messages = atol(optarg); opt_messages_set = 1; break;
		case 'd': opt_duration = atof(optarg); break;
		case 'r': opt_rcpts = atoi(optarg); break;
		case 'b': opt_body = atol(optarg); break;
		case 'm': opt_per_conn = atol(optarg); break;
		case 't': opt_timeout = atoi(optarg); break;
		case 'M': opt_macros = 1; break;
		case 'S': opt_spin_us = atol(optarg); break;
		case 'v': opt_verbose = 1; break;
		default: usage();
		}
	}
	if (opt_sock == NULL || optind != argc)
		usage();
	if (opt_conns < 1 || opt_conns > MAX_CONNS)
		die("-c must be 1..%d", MAX_CONNS);
	if (opt_rcpts < 0 || opt_rcpts > MAX_RCPTS)
		die("-r must be 0..%d", MAX_RCPTS);
	if (opt_body < 0 || opt_body > MAX_BODY)
		die("-b must be 0..%ld", MAX_BODY);
	if (opt_messages < 1)
		die("-n must be >= 1");
	if (opt_duration < 0 || opt_duration > 3600)
		die("-d must be 0..3600");
	if (opt_timeout < 1 || opt_timeout > 600)
		die("-t must be 1..600");
	if (opt_spin_us < 0 || opt_spin_us > 1000000)
		die("-S must be 0..1000000");
	if (opt_duration > 0 && !opt_messages_set)
		opt_messages = 1000000000L; /* bound for duration mode */
	signal(SIGPIPE, SIG_IGN);
	parse_sockspec(opt_sock);
	build_packets();
	fix_macros();

	ws = calloc((size_t)opt_conns, sizeof(*ws));
	if (ws == NULL)
		die("out of memory");
	if (pthread_barrier_init(&start_barrier, NULL, (unsigned)opt_conns + 1) != 0 ||
	    pthread_barrier_init(&go_barrier, NULL, (unsigned)opt_conns + 1) != 0)
		die("pthread_barrier_init failed");
	for (i = 0; i < opt_conns; i++) {
		ws[i].idx = i;
		ws[i].quota = opt_messages / opt_conns + (i < opt_messages % opt_conns);
		if (pthread_create(&ws[i].tid, NULL, run_worker, &ws[i]) != 0)
			die("pthread_create failed");
	}
	/* first barrier: every worker has connected and negotiated; the clock
	 * starts, then the second barrier releases the workers (the barriers
	 * also order the memory accesses to t_deadline) */
	pthread_barrier_wait(&start_barrier);
	t_start = now();
	t_deadline = t_start + opt_duration;
	pthread_barrier_wait(&go_barrier);
	for (i = 0; i < opt_conns; i++)
		pthread_join(ws[i].tid, NULL);
	elapsed = now() - t_start;

	for (i = 0; i < opt_conns; i++) {
		total += ws[i].done;
		fails += ws[i].failures;
		cerr += ws[i].conn_errors;
		nlat += ws[i].nlat;
	}
	all = malloc((size_t)(nlat ? nlat : 1) * sizeof(double));
	if (all == NULL)
		die("out of memory");
	for (k = 0, i = 0; i < opt_conns; i++) {
		if (ws[i].nlat)
			memcpy(all + k, ws[i].lat, (size_t)ws[i].nlat * sizeof(double));
		k += ws[i].nlat;
	}
	qsort(all, (size_t)nlat, sizeof(double), cmp_double);
	getrusage(RUSAGE_SELF, &ru);
	if (opt_verbose)
		fprintf(stderr, "loadgen: negotiated actions 0x%lx protocol 0x%lx\n",
			neg_actions, neg_pflags);
	printf("{\"messages\":%ld,\"failures\":%ld,\"seconds\":%.4f,\"msg_per_s\":%.1f,"
	       "\"p50_ms\":%.4f,\"p99_ms\":%.4f,\"connections\":%d,\"body\":%ld,"
	       "\"rcpts\":%d,\"max_ms\":%.4f,\"conn_errors\":%ld,"
	       "\"loadgen_cpu_s\":%.4f,\"milter_actions\":%lu,\"milter_protocol\":%lu}\n",
	       total, fails, elapsed, elapsed > 0 ? (double)(total - fails) / elapsed : 0.0,
	       pct(all, nlat, 0.50) * 1e3, pct(all, nlat, 0.99) * 1e3, opt_conns, opt_body,
	       opt_rcpts, nlat ? all[nlat - 1] * 1e3 : 0.0, cerr,
	       (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
	       (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6,
	       neg_actions, neg_pflags);
	fflush(stdout);
	return (fails > 0 || cerr > 0 || total == 0) ? 1 : 0;
}
