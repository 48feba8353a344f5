/*
 * callloop.c -- calls milter callbacks in a loop, the way libmilter calls them, for
 * benchmarks/callbacks.py (the per-callback cost of pymilterkit's trampolines).
 *
 * Built as build/libcallloop.so; loaded with ctypes. Nothing here talks to a socket.
 */
#include <stddef.h>

typedef int (*ctx_cb)(void *);
typedef int (*argv_cb)(void *, char **);

/* envfrom/envrcpt: an address alone, or with ESMTP parameters (Postfix's MAIL FROM) */
int loop_argv(argv_cb cb, void *ctx, int with_params, long n)
{
	char *plain[] = { "<rcpt@example.org>", NULL };
	char *params[] = { "<sender@example.net>", "SIZE=1000", "BODY=8BITMIME", NULL };
	char **argv = with_params ? params : plain;
	int sum = 0;
	for (long i = 0; i < n; i++)
		sum += cb(ctx, argv);
	return sum;
}

/* eoh/eom/data/abort/close */
int loop_ctx(ctx_cb cb, void *ctx, long n)
{
	int sum = 0;
	for (long i = 0; i < n; i++)
		sum += cb(ctx);
	return sum;
}

/* stands in for smfi_addheader: same signature, does nothing */
int stub_addheader(void *ctx, char *name, char *value)
{
	(void)ctx; (void)name; (void)value;
	return 0;
}
