/*
 * A test double of libvaccel, built by the test suite with `cc` at test time.
 *
 * One source, one build per ABI generation (-DVDOUBLE_ABI=...):
 *   5   0.5:     vaccel_sess_init/free, uint32 id at offset 0,
 *                struct vaccel_arg { uint32 size; void *buf; }, no vaccel_exec,
 *                plugins from VACCEL_BACKENDS, a failing plugin is skipped
 *   6   0.6:     as 0.5 plus vaccel_session_init/free, vaccel_exec,
 *                struct vaccel_arg { uint32 argtype; uint32 size; void *buf; }
 *   7   0.7:     vaccel_session_init/release, int64 id at offset 0,
 *                VACCEL_PLUGINS (then VACCEL_BACKENDS)
 *   8   current: 0.7 plus vaccel_session_new/delete (library allocates),
 *                struct vaccel_arg { void *buf; size_t size; uint32 type;
 *                uint32 custom_type_id; bool owned; }, vaccel_arg_init
 *
 * Like the real library, an ELF constructor reads the plugin variable and
 * dlopens each plugin; a plugin registers its classifier through
 * vdouble_register_classify().  From 0.6 on, a plugin that fails to load
 * makes the constructor exit() the process, as the real one does.
 *
 * The double checks what it is given (session pointers it handed out, non-NULL
 * buffers, non-zero lengths, arg sizes), records every call as one line in the
 * file named by VDOUBLE_LOG, and simulates failures:
 *   VDOUBLE_FAIL_<OP>=<errno>  make <OP> (SESSION_INIT, SESSION_RELEASE,
 *                              CLASSIFY, GENOP, EXEC) return that code
 *   VDOUBLE_SKIP_PLUGINS=1     load no plugin (operations return ENOTSUP)
 *   VDOUBLE_CLASSIFY_SLEEP_US  sleep inside classification (concurrency tests)
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifndef VDOUBLE_ABI
#error "define VDOUBLE_ABI (5, 6, 7 or 8)"
#endif

#define EXPORT __attribute__((visibility("default")))

/* ---- ABI-dependent layouts ------------------------------------------------ */

#if VDOUBLE_ABI <= 6
typedef uint32_t vaccel_id_t;
#define ID_FMT "%" PRIu32
struct vaccel_session {
	uint32_t session_id; /* offset 0 */
	void *resources;
	void *priv;
};
#else
typedef int64_t vaccel_id_t;
#define ID_FMT "%" PRId64
struct vaccel_session {
	int64_t id; /* offset 0 */
	int64_t remote_id;
	unsigned int hint;
	bool is_virtio;
	char rundir[4096];
	void *resources[3];
	size_t resource_counts[3];
	char lock_space[40];
	void *plugin;
	void *priv;
};
#define session_id id
#endif

#if VDOUBLE_ABI == 5
struct vaccel_arg {
	uint32_t size;
	void *buf;
};
#define ARG_TYPE(a) 0u
#elif VDOUBLE_ABI <= 7
struct vaccel_arg {
	uint32_t argtype;
	uint32_t size;
	void *buf;
};
#define ARG_TYPE(a) ((a)->argtype)
#else
struct vaccel_arg {
	void *buf;
	size_t size;
	uint32_t type;
	uint32_t custom_type_id;
	bool owned;
};
#define ARG_TYPE(a) ((a)->type)
#endif

/* ---- call log, failure switches, live sessions ---------------------------- */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

#define MAX_SESSIONS 4096
static struct vaccel_session *live[MAX_SESSIONS];
static vaccel_id_t next_id = 1;
static int plugins_loaded;

typedef int (*classify_fn)(const void *img, size_t len_img, unsigned char *out_text,
			   size_t len_out_text, unsigned char *out_imgname,
			   size_t len_out_imgname);
static classify_fn plugin_classify;

static void record(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void record(const char *fmt, ...)
{
	const char *path = getenv("VDOUBLE_LOG");
	if (!path || !*path)
		return;
	char line[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	pthread_mutex_lock(&lock);
	FILE *f = fopen(path, "a");
	if (f) {
		fprintf(f, "%s\n", line);
		fclose(f);
	}
	pthread_mutex_unlock(&lock);
}

static int fail_code(const char *op)
{
	char name[64];
	snprintf(name, sizeof(name), "VDOUBLE_FAIL_%s", op);
	const char *v = getenv(name);
	return v ? atoi(v) : 0;
}

static int is_live(const struct vaccel_session *s)
{
	int found = 0;
	pthread_mutex_lock(&lock);
	for (int i = 0; i < MAX_SESSIONS; i++)
		if (live[i] == s) {
			found = 1;
			break;
		}
	pthread_mutex_unlock(&lock);
	return found;
}

static unsigned long checksum(const void *buf, size_t len)
{
	const unsigned char *p = buf;
	unsigned long sum = 0;
	for (size_t i = 0; i < len; i++)
		sum += p[i];
	return sum;
}

#define BADARG(op, why)                                  \
	do {                                             \
		record("BADARG %s %s", (op), (why));     \
		return EINVAL;                           \
	} while (0)

/* ---- plugin loading (constructor) ----------------------------------------- */

EXPORT int vdouble_register_classify(classify_fn fn)
{
	plugin_classify = fn;
	plugins_loaded++;
	return 0;
}

static void load_plugins(void)
{
	const char *env = NULL;
	const char *var = NULL;
#if VDOUBLE_ABI >= 7
	env = getenv("VACCEL_PLUGINS");
	var = "VACCEL_PLUGINS";
#endif
	if (!env) {
		env = getenv("VACCEL_BACKENDS");
		var = "VACCEL_BACKENDS";
	}
	record("init abi=%d %s=%s", VDOUBLE_ABI, var, env ? env : "(unset)");
	const char *skip = getenv("VDOUBLE_SKIP_PLUGINS");
	if (!env || (skip && *skip == '1'))
		return;
	char *list = strdup(env);
	for (char *save = NULL, *p = strtok_r(list, ":", &save); p;
	     p = strtok_r(NULL, ":", &save)) {
		/* DEEPBIND: the test suite loads several doubles into one process
		 * RTLD_GLOBAL; the plugin must call back into its own library. */
		void *dl = dlopen(p, RTLD_NOW | RTLD_DEEPBIND);
		if (!dl) {
			fprintf(stderr, "[vaccel double] Could not dlopen plugin %s: %s\n", p,
				dlerror());
			record("plugin_load_failed %s", p);
#if VDOUBLE_ABI >= 6
			exit(ENOENT); /* the real 0.6+ constructor exits too */
#else
			continue;
#endif
		}
		int (*init)(void) = (int (*)(void))dlsym(dl, "vdouble_plugin_init");
		if (!init || init() != 0) {
			fprintf(stderr, "[vaccel double] plugin %s has no init\n", p);
#if VDOUBLE_ABI >= 6
			exit(ELIBBAD);
#else
			continue;
#endif
		}
		record("plugin_loaded %s", p);
	}
	free(list);
}

__attribute__((constructor)) static void vdouble_init(void)
{
	load_plugins();
}

/* ---- sessions -------------------------------------------------------------- */

static int session_init(const char *fn, struct vaccel_session *sess, uint32_t flags)
{
	if (!sess)
		BADARG(fn, "sess=NULL");
	int code = fail_code("SESSION_INIT");
	if (code) {
		record("%s flags=%u -> %d", fn, flags, code);
		return code;
	}
	pthread_mutex_lock(&lock);
	int slot = -1;
	for (int i = 0; i < MAX_SESSIONS; i++)
		if (!live[i]) {
			slot = i;
			break;
		}
	if (slot < 0) {
		pthread_mutex_unlock(&lock);
		return EUSERS;
	}
	memset(sess, 0, sizeof(*sess));
	sess->session_id = next_id++;
	live[slot] = sess;
	pthread_mutex_unlock(&lock);
	record("%s sess=%p id=" ID_FMT " flags=%u", fn, (void *)sess, sess->session_id, flags);
	return 0;
}

static int session_release(const char *fn, struct vaccel_session *sess)
{
	if (!sess)
		BADARG(fn, "sess=NULL");
	if (!is_live(sess))
		BADARG(fn, "unknown session pointer");
	int code = fail_code("SESSION_RELEASE");
	if (code) {
		record("%s id=" ID_FMT " -> %d", fn, sess->session_id, code);
		return code;
	}
	pthread_mutex_lock(&lock);
	for (int i = 0; i < MAX_SESSIONS; i++)
		if (live[i] == sess)
			live[i] = NULL;
	pthread_mutex_unlock(&lock);
	record("%s sess=%p id=" ID_FMT, fn, (void *)sess, sess->session_id);
	return 0;
}

EXPORT int vaccel_sess_init(struct vaccel_session *sess, uint32_t flags)
{
	return session_init("vaccel_sess_init", sess, flags);
}

EXPORT int vaccel_sess_free(struct vaccel_session *sess)
{
	return session_release("vaccel_sess_free", sess);
}

#if VDOUBLE_ABI >= 6
EXPORT int vaccel_session_init(struct vaccel_session *sess, uint32_t flags)
{
	return session_init("vaccel_session_init", sess, flags);
}
#endif

#if VDOUBLE_ABI == 6
EXPORT int vaccel_session_free(struct vaccel_session *sess)
{
	return session_release("vaccel_session_free", sess);
}
#endif

#if VDOUBLE_ABI >= 7
EXPORT int vaccel_session_release(struct vaccel_session *sess)
{
	return session_release("vaccel_session_release", sess);
}
#endif

#if VDOUBLE_ABI >= 8
EXPORT int vaccel_session_new(struct vaccel_session **sess, uint32_t flags)
{
	if (!sess)
		BADARG("vaccel_session_new", "sess=NULL");
	struct vaccel_session *s = calloc(1, sizeof(*s));
	if (!s)
		return ENOMEM;
	int ret = session_init("vaccel_session_new", s, flags);
	if (ret) {
		free(s);
		return ret;
	}
	*sess = s;
	return 0;
}

EXPORT int vaccel_session_delete(struct vaccel_session *sess)
{
	int ret = session_release("vaccel_session_delete", sess);
	if (ret)
		return ret;
	free(sess);
	return 0;
}

EXPORT int vaccel_arg_init(struct vaccel_arg *arg, const void *buf, size_t size,
			   uint32_t type, uint32_t custom_id)
{
	(void)arg; (void)buf; (void)size; (void)type; (void)custom_id;
	return ENOTSUP; /* present so the binding can detect the layout */
}

EXPORT int vaccel_bootstrap(void) { return 0; }
EXPORT int vaccel_cleanup(void) { return 0; }
EXPORT bool vaccel_is_initialized(void) { return true; }
#endif

#if VDOUBLE_ABI == 6 || VDOUBLE_ABI == 7
EXPORT void *vaccel_args_init(uint32_t size)
{
	(void)size;
	return NULL; /* present so the binding can detect the layout */
}
#endif

/* ---- image classification -------------------------------------------------- */

static int do_classify(const char *fn, struct vaccel_session *sess, const void *img,
		       unsigned char *out_text, unsigned char *out_imgname, size_t len_img,
		       size_t len_out_text, size_t len_out_imgname)
{
	if (!sess)
		BADARG(fn, "sess=NULL");
	if (!is_live(sess))
		BADARG(fn, "unknown session pointer");
	if (!img || !len_img)
		BADARG(fn, "empty image");
	if (!out_text || !len_out_text)
		BADARG(fn, "no text buffer");
	if (!out_imgname || !len_out_imgname)
		BADARG(fn, "no imgname buffer");
	record("%s sess=%p id=" ID_FMT " len_img=%zu sum_img=%lu len_out_text=%zu len_out_imgname=%zu",
	       fn, (void *)sess, sess->session_id, len_img, checksum(img, len_img), len_out_text,
	       len_out_imgname);
	const char *sleep_us = getenv("VDOUBLE_CLASSIFY_SLEEP_US");
	if (sleep_us)
		usleep((useconds_t)atoi(sleep_us));
	int code = fail_code("CLASSIFY");
	if (code)
		return code;
	if (!plugin_classify)
		return ENOTSUP; /* no plugin registered the operation */
	return plugin_classify(img, len_img, out_text, len_out_text, out_imgname,
			       len_out_imgname);
}

EXPORT int vaccel_image_classification(struct vaccel_session *sess, const void *img,
				       unsigned char *out_text, unsigned char *out_imgname,
				       size_t len_img, size_t len_out_text,
				       size_t len_out_imgname)
{
	return do_classify("vaccel_image_classification", sess, img, out_text, out_imgname,
			   len_img, len_out_text, len_out_imgname);
}

/* ---- genop and exec ---------------------------------------------------------- */

static int check_args(const char *fn, struct vaccel_arg *args, long nr, const char *which)
{
	if (nr < 0)
		BADARG(fn, "negative argument count");
	if (nr > 0 && !args)
		BADARG(fn, "NULL argument array");
	for (long i = 0; i < nr; i++) {
		if (args[i].size && !args[i].buf)
			BADARG(fn, "argument with size and no buffer");
		/* every byte must be readable: the checksum touches them all */
		record("%s %s[%ld] type=%u size=%zu sum=%lu", fn, which, i, ARG_TYPE(&args[i]),
		       (size_t)args[i].size, checksum(args[i].buf, args[i].size));
	}
	return 0;
}

EXPORT int vaccel_genop(struct vaccel_session *sess, struct vaccel_arg *read, int nr_read,
			struct vaccel_arg *write, int nr_write)
{
	const char *fn = "vaccel_genop";
	if (!sess)
		BADARG(fn, "sess=NULL");
	if (!is_live(sess))
		BADARG(fn, "unknown session pointer");
	record("%s id=" ID_FMT " nr_read=%d nr_write=%d", fn, sess->session_id, nr_read,
	       nr_write);
	if (check_args(fn, read, nr_read, "read") || check_args(fn, write, nr_write, "write"))
		return EINVAL;
	int code = fail_code("GENOP");
	if (code)
		return code;
	if (nr_read < 1 || read[0].size != sizeof(uint32_t))
		BADARG(fn, "first read argument must be the uint32 op type");
	uint32_t op = *(uint32_t *)read[0].buf;
	if (op == 2) { /* VACCEL_IMG_CLASS */
		if (nr_read < 2 || nr_write < 2)
			BADARG(fn, "image classification needs 2 read and 2 write arguments");
		return do_classify("genop:image_classification", sess, read[1].buf,
				   write[0].buf, write[1].buf, read[1].size, write[0].size,
				   write[1].size);
	}
	return ENOTSUP;
}

#if VDOUBLE_ABI >= 6
EXPORT int vaccel_exec(struct vaccel_session *sess, const char *library, const char *fn_symbol,
		       struct vaccel_arg *read, size_t nr_read, struct vaccel_arg *write,
		       size_t nr_write)
{
	const char *fn = "vaccel_exec";
	if (!sess)
		BADARG(fn, "sess=NULL");
	if (!is_live(sess))
		BADARG(fn, "unknown session pointer");
	if (!library || !fn_symbol)
		BADARG(fn, "NULL library or symbol");
	record("%s id=" ID_FMT " library=%s symbol=%s nr_read=%zu nr_write=%zu", fn,
	       sess->session_id, library, fn_symbol, nr_read, nr_write);
	if (check_args(fn, read, (long)nr_read, "read") ||
	    check_args(fn, write, (long)nr_write, "write"))
		return EINVAL;
	int code = fail_code("EXEC");
	if (code)
		return code;
	if (!plugins_loaded)
		return ENOTSUP;
	/* "run" fn_symbol: write[i] = "<symbol>:" + read[i] bytes, truncated */
	for (size_t i = 0; i < nr_write; i++) {
		unsigned char *out = write[i].buf;
		size_t size = write[i].size, n = 0;
		for (const char *s = fn_symbol; *s && n < size; s++)
			out[n++] = (unsigned char)*s;
		if (n < size)
			out[n++] = ':';
		if (i < nr_read) {
			const unsigned char *in = read[i].buf;
			for (size_t j = 0; j < read[i].size && n < size; j++)
				out[n++] = in[j];
		}
	}
	return 0;
}
#endif
