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

/* Session structs, sized as DESIGN §5 measured them on the real releases. */
#if VDOUBLE_ABI <= 6
typedef uint32_t vaccel_id_t;
#define ID_FMT "%" PRIu32
struct vaccel_session {
	uint32_t session_id; /* offset 0 */
	void *resources;
#if VDOUBLE_ABI == 6
	unsigned int hint;
#endif
	void *priv;
};
_Static_assert(sizeof(struct vaccel_session) == (VDOUBLE_ABI == 5 ? 24 : 32), "session size");
#else
typedef int64_t vaccel_id_t;
#define ID_FMT "%" PRId64
struct vaccel_session {
	int64_t id; /* offset 0 */
	char rest[VDOUBLE_ABI == 7 ? 40 : 4256];
};
_Static_assert(sizeof(struct vaccel_session) == (VDOUBLE_ABI == 7 ? 48 : 4264), "session size");
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

/* ---- plugins: the real shape ------------------------------------------------
 *
 * A plugin exports `const struct vaccel_plugin *vaccel_plugin`; the library
 * calls register_plugin() with it, then its info->init(), which registers the
 * plugin's operations with register_plugin_functions().  Offsets as DESIGN §5
 * gives them for 0.5 (the same in 0.6).  Operation numbers are the double's own
 * (VDOUBLE_OP_* in vdouble_ops.h, shared with plugin_double.c).
 */
#include "vdouble_ops.h"

struct vdouble_list_entry {
	struct vdouble_list_entry *next, *prev;
};

struct vaccel_plugin_info {
	const char *name;
	const char *version;
	int (*init)(void);
	int (*fini)(void);
};

struct vaccel_plugin {
	void *dl_handle;
	struct vdouble_list_entry entry;
	struct vdouble_list_entry ops;
	struct vaccel_plugin_info *info;
};
_Static_assert(offsetof(struct vaccel_plugin, info) == 40, "plugin info offset");
_Static_assert(offsetof(struct vaccel_plugin_info, init) == 16, "plugin init offset");

struct vaccel_op {
	uint8_t type;
	void *func;
	struct vaccel_plugin *owner;
	struct vdouble_list_entry plugin_entry;
	struct vdouble_list_entry func_entry;
};

static struct vaccel_plugin *registered[16];
static int nr_registered;
static void *op_table[VDOUBLE_OP_MAX];

/* Calls inside the library go to static functions: an exported one could be
 * interposed by another double loaded RTLD_GLOBAL earlier in the process. */
static int plugin_register(struct vaccel_plugin *plugin)
{
	if (!plugin || !plugin->info || !plugin->info->init)
		BADARG("register_plugin", "not a plugin (NULL, or no info/init)");
	if (nr_registered == 16)
		return ENOMEM;
	registered[nr_registered++] = plugin;
	record("register_plugin name=%s", plugin->info->name ? plugin->info->name : "(null)");
	return 0;
}

EXPORT int register_plugin(struct vaccel_plugin *plugin)
{
	return plugin_register(plugin);
}

EXPORT int register_plugin_functions(struct vaccel_op *ops, size_t nr_ops)
{
	if (!ops || !nr_ops)
		BADARG("register_plugin_functions", "no operations");
	for (size_t i = 0; i < nr_ops; i++) {
		int known = 0;
		for (int p = 0; p < nr_registered; p++)
			known |= registered[p] == ops[i].owner;
		if (!known)
			BADARG("register_plugin_functions", "operation of a plugin never registered");
		if (ops[i].type >= VDOUBLE_OP_MAX || !ops[i].func)
			BADARG("register_plugin_functions", "bad operation");
		op_table[ops[i].type] = ops[i].func;
	}
	plugins_loaded++;
	record("register_plugin_functions nr_ops=%zu", nr_ops);
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
#if VDOUBLE_ABI == 5
		/* as the real 0.5: lazily, in the default scope */
		void *dl = dlopen(p, RTLD_LAZY);
#else
		/* DEEPBIND: the test suite loads several doubles into one process;
		 * the plugin (which links its library) must call back into it. */
		void *dl = dlopen(p, RTLD_NOW | RTLD_DEEPBIND);
#endif
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
		struct vaccel_plugin **plugin = dlsym(dl, "vaccel_plugin");
		if (!plugin || plugin_register(*plugin) || (*plugin)->info->init()) {
			fprintf(stderr, "[vaccel double] %s is not a working vAccel plugin\n", p);
#if VDOUBLE_ABI >= 6
			exit(ELIBBAD);
#else
			continue;
#endif
		}
		(*plugin)->dl_handle = dl;
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
	vdouble_classify_fn plugin_classify = (vdouble_classify_fn)op_table[VDOUBLE_OP_CLASSIFY];
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

/* ---- model objects ------------------------------------------------------------
 *
 * Layouts from the headers of each release (include/vaccel/ops/ headers,
 * resource.h, blob.h; 0.5/0.6 resources/tf_saved_model.h, single_model.h).
 * Every model object the double hands out is remembered; an operation given
 * anything else, or a model not registered with its session, is refused.
 */
#define MAX_MODELS 1024
struct model_slot {
	void *object;		   /* what the caller holds */
	struct vaccel_session *sess; /* registered with (NULL: none) */
	const char *kind;
	unsigned long sum;	   /* checksum of the model's bytes */
	size_t size;
};
static struct model_slot models[MAX_MODELS];
static long live_tensors;

static struct model_slot *model_slot(const void *object)
{
	for (int i = 0; i < MAX_MODELS; i++)
		if (object && models[i].object == object)
			return &models[i];
	return NULL;
}

static struct model_slot *model_add(void *object, const char *kind)
{
	pthread_mutex_lock(&lock);
	for (int i = 0; i < MAX_MODELS; i++)
		if (!models[i].object) {
			memset(&models[i], 0, sizeof(models[i]));
			models[i].object = object;
			models[i].kind = kind;
			pthread_mutex_unlock(&lock);
			return &models[i];
		}
	pthread_mutex_unlock(&lock);
	return NULL;
}

static int copy_in(void **dst, const void *src, size_t size)
{
	*dst = malloc(size ? size : 1);
	if (!*dst)
		return ENOMEM;
	if (size)
		memcpy(*dst, src, size);
	return 0;
}

/* The object a model op is given must be one the double made, registered with
 * that session.  (`registered_with` is the object whose slot holds it.) */
static int check_model(const char *fn, struct vaccel_session *sess, const void *object,
		       const char *kind)
{
	if (!sess || !is_live(sess))
		BADARG(fn, "unknown session pointer");
	struct model_slot *slot = model_slot(object);
	if (!slot || strcmp(slot->kind, kind) != 0)
		BADARG(fn, "not a model object of this library");
	if (slot->sess != sess)
		BADARG(fn, "model not registered with this session");
	return 0;
}

#if VDOUBLE_ABI <= 6
/* 0.5/0.6: models wrap an internal resource; vaccel_sess_register takes that. */
struct vaccel_resource {
	vaccel_id_t id;
	void *model;
};

struct vaccel_file {
	char *path;
	bool path_owned;
	uint8_t *data;
	size_t size;
};
_Static_assert(sizeof(struct vaccel_file) == 32, "vaccel_file size");

struct vaccel_tf_saved_model {
	struct vaccel_resource *resource; /* offset 0: what the binding registers */
	const char *path;
	struct vaccel_file model;
	struct vaccel_file checkpoint;
	struct vaccel_file var_index;
	void *priv;
};

static vaccel_id_t next_resource = 1;

static struct vaccel_resource *resource_for(void *model)
{
	struct vaccel_resource *res = calloc(1, sizeof(*res));
	if (res) {
		res->id = next_resource++;
		res->model = model;
	}
	return res;
}

static struct model_slot *slot_of_resource(struct vaccel_resource *res)
{
	for (int i = 0; i < MAX_MODELS; i++)
		if (res && models[i].object && models[i].object == res->model)
			return &models[i];
	return NULL;
}

EXPORT int vaccel_sess_register(struct vaccel_session *sess, struct vaccel_resource *res)
{
	struct model_slot *slot = slot_of_resource(res);
	if (!sess || !is_live(sess))
		BADARG("vaccel_sess_register", "unknown session pointer");
	if (!slot)
		BADARG("vaccel_sess_register", "not a registered model's resource");
	if (slot->sess)
		BADARG("vaccel_sess_register", "already registered");
	slot->sess = sess;
	record("vaccel_sess_register id=" ID_FMT " kind=%s size=%zu sum=%lu", sess->session_id,
	       slot->kind, slot->size, slot->sum);
	return 0;
}

EXPORT int vaccel_sess_unregister(struct vaccel_session *sess, struct vaccel_resource *res)
{
	struct model_slot *slot = slot_of_resource(res);
	if (!slot || slot->sess != sess)
		BADARG("vaccel_sess_unregister", "not registered with this session");
	slot->sess = NULL;
	record("vaccel_sess_unregister id=" ID_FMT " kind=%s", sess->session_id, slot->kind);
	return 0;
}

EXPORT struct vaccel_tf_saved_model *vaccel_tf_saved_model_new(void)
{
	struct vaccel_tf_saved_model *m = calloc(1, sizeof(*m));
	if (m && !model_add(m, "saved_model")) {
		free(m);
		return NULL;
	}
	return m;
}

EXPORT int vaccel_tf_saved_model_set_path(struct vaccel_tf_saved_model *m, const char *path)
{
	struct model_slot *slot = model_slot(m);
	if (!slot || !path)
		BADARG("vaccel_tf_saved_model_set_path", "bad model or path");
	m->path = strdup(path);
	record("vaccel_tf_saved_model_set_path path=%s", path);
	return 0;
}

static int saved_model_set(const char *fn, struct vaccel_tf_saved_model *m,
			   struct vaccel_file *file, const uint8_t *ptr, size_t len)
{
	struct model_slot *slot = model_slot(m);
	if (!slot || !ptr || !len)
		BADARG(fn, "bad model or empty buffer");
	if (file->data)
		BADARG(fn, "set twice");
	if (copy_in((void **)&file->data, ptr, len))
		return ENOMEM;
	file->size = len;
	slot->size += len;
	slot->sum += checksum(ptr, len);
	record("%s size=%zu sum=%lu", fn, len, checksum(ptr, len));
	return 0;
}

EXPORT int vaccel_tf_saved_model_set_model(struct vaccel_tf_saved_model *m, const uint8_t *ptr,
					   size_t len)
{
	return saved_model_set("vaccel_tf_saved_model_set_model", m, m ? &m->model : NULL, ptr, len);
}

EXPORT int vaccel_tf_saved_model_set_checkpoint(struct vaccel_tf_saved_model *m,
						const uint8_t *ptr, size_t len)
{
	return saved_model_set("vaccel_tf_saved_model_set_checkpoint", m,
			       m ? &m->checkpoint : NULL, ptr, len);
}

EXPORT int vaccel_tf_saved_model_set_var_index(struct vaccel_tf_saved_model *m,
					       const uint8_t *ptr, size_t len)
{
	return saved_model_set("vaccel_tf_saved_model_set_var_index", m,
			       m ? &m->var_index : NULL, ptr, len);
}

EXPORT int vaccel_tf_saved_model_register(struct vaccel_tf_saved_model *m)
{
	if (!model_slot(m) || m->resource)
		BADARG("vaccel_tf_saved_model_register", "bad model or registered twice");
	if (!m->path && !m->model.data)
		BADARG("vaccel_tf_saved_model_register", "a saved model needs a path or a model file");
	m->resource = resource_for(m);
	return m->resource ? 0 : ENOMEM;
}

EXPORT int vaccel_tf_saved_model_destroy(struct vaccel_tf_saved_model *m)
{
	struct model_slot *slot = model_slot(m);
	if (!slot)
		BADARG("vaccel_tf_saved_model_destroy", "not a saved model of this library");
	if (slot->sess)
		BADARG("vaccel_tf_saved_model_destroy", "still registered with a session");
	record("vaccel_tf_saved_model_destroy");
	free(m->model.data);
	free(m->checkpoint.data);
	free(m->var_index.data);
	free((void *)m->path);
	free(m->resource);
	slot->object = NULL;
	free(m);
	return 0;
}

#if VDOUBLE_ABI == 6
struct vaccel_single_model {
	struct vaccel_resource *resource; /* offset 0 */
	const char *path;
	const char *filename;
	struct vaccel_file file;
	void *plugin_data;
};

EXPORT struct vaccel_single_model *vaccel_single_model_new(void)
{
	struct vaccel_single_model *m = calloc(1, sizeof(*m));
	if (m && !model_add(m, "single_model")) {
		free(m);
		return NULL;
	}
	return m;
}

EXPORT int vaccel_single_model_set_path(struct vaccel_single_model *m, const char *path)
{
	if (!model_slot(m) || !path)
		BADARG("vaccel_single_model_set_path", "bad model or path");
	m->path = strdup(path);
	record("vaccel_single_model_set_path path=%s", path);
	return 0;
}

EXPORT int vaccel_single_model_set_file(struct vaccel_single_model *m, const char *filename,
					const uint8_t *ptr, size_t len)
{
	struct model_slot *slot = model_slot(m);
	if (!slot || !filename || !ptr || !len)
		BADARG("vaccel_single_model_set_file", "bad model, name or buffer");
	if (copy_in((void **)&m->file.data, ptr, len))
		return ENOMEM;
	m->file.size = len;
	m->filename = strdup(filename);
	slot->size = len;
	slot->sum = checksum(ptr, len);
	record("vaccel_single_model_set_file name=%s size=%zu sum=%lu", filename, len, slot->sum);
	return 0;
}

EXPORT int vaccel_single_model_register(struct vaccel_single_model *m)
{
	if (!model_slot(m) || m->resource || (!m->path && !m->file.data))
		BADARG("vaccel_single_model_register", "bad model, registered twice or empty");
	m->resource = resource_for(m);
	return m->resource ? 0 : ENOMEM;
}

EXPORT int vaccel_single_model_destroy(struct vaccel_single_model *m)
{
	struct model_slot *slot = model_slot(m);
	if (!slot || slot->sess)
		BADARG("vaccel_single_model_destroy", "unknown, or still registered");
	record("vaccel_single_model_destroy");
	free(m->file.data);
	free((void *)m->filename);
	free((void *)m->path);
	free(m->resource);
	slot->object = NULL;
	free(m);
	return 0;
}
#endif /* 0.6 */

#else /* 0.7 and current: struct vaccel_resource */

#if VDOUBLE_ABI == 7
struct vaccel_resource {
	struct vdouble_list_entry entry;
	vaccel_id_t id;
	vaccel_id_t remote_id;
	int type;
	int path_type;
	unsigned int refcount;
	char **paths;
	size_t nr_paths;
	char *rundir;
	void **files;
	size_t nr_files;
};
#else
struct vaccel_blob {
	int type; /* VACCEL_BLOB_FILE 0, BUFFER 1, MAPPED 2 */
	char *name;
	char *path;
	bool path_owned;
	uint8_t *data;
	bool data_owned;
	size_t size;
};
_Static_assert(sizeof(struct vaccel_blob) == 56, "vaccel_blob size");

struct vaccel_resource {
	vaccel_id_t id;
	vaccel_id_t remote_id;
	int type;
	int path_type;
	char **paths;
	size_t nr_paths;
	char *rundir;
	struct vaccel_blob **blobs;
	size_t nr_blobs;
	struct vdouble_list_entry entry;
	struct vdouble_list_entry sessions;
	pthread_mutex_t sessions_lock;
	unsigned int refcount;
	void *plugin_priv;
};
_Static_assert(offsetof(struct vaccel_resource, blobs) == 48, "resource blobs offset");
_Static_assert(offsetof(struct vaccel_resource, nr_blobs) == 56, "resource nr_blobs offset");
#endif

static vaccel_id_t next_resource = 1;

static struct vaccel_resource *resource_alloc(int type)
{
	struct vaccel_resource *res = calloc(1, sizeof(*res));
	if (!res)
		return NULL;
	res->id = next_resource++;
	res->type = type;
	if (!model_add(res, "resource")) {
		free(res);
		return NULL;
	}
	return res;
}

EXPORT int vaccel_resource_multi_new(struct vaccel_resource **out, const char **paths,
				     size_t nr_paths, int type)
{
	if (!out || !paths || !nr_paths || type != 2)
		BADARG("vaccel_resource_multi_new", "bad arguments (or not a MODEL)");
	struct vaccel_resource *res = resource_alloc(type);
	if (!res)
		return ENOMEM;
	res->paths = calloc(nr_paths, sizeof(char *));
	for (size_t i = 0; i < nr_paths; i++) {
		if (!paths[i])
			BADARG("vaccel_resource_multi_new", "NULL path");
		res->paths[i] = strdup(paths[i]);
		/* the files must exist and be readable, as the library reads them */
		FILE *f = fopen(paths[i], "rb");
		if (!f) {
			record("vaccel_resource_multi_new missing=%s", paths[i]);
			return ENOENT;
		}
		int c;
		struct model_slot *slot = model_slot(res);
		while ((c = fgetc(f)) != EOF) {
			slot->size++;
			slot->sum += (unsigned char)c;
		}
		fclose(f);
	}
	res->nr_paths = nr_paths;
	*out = res;
	record("vaccel_resource_multi_new nr_paths=%zu size=%zu sum=%lu", nr_paths,
	       model_slot(res)->size, model_slot(res)->sum);
	return 0;
}

#if VDOUBLE_ABI == 7
EXPORT int vaccel_resource_from_buf(struct vaccel_resource **out, const void *buf,
				    size_t nr_bytes, int type, const char *filename)
{
	if (!out || !buf || !nr_bytes || type != 2 || !filename || !*filename)
		BADARG("vaccel_resource_from_buf", "bad arguments (or not a MODEL)");
	struct vaccel_resource *res = resource_alloc(type);
	if (!res)
		return ENOMEM;
	struct model_slot *slot = model_slot(res);
	slot->size = nr_bytes;
	slot->sum = checksum(buf, nr_bytes);
	*out = res;
	record("vaccel_resource_from_buf name=%s size=%zu sum=%lu", filename, nr_bytes, slot->sum);
	return 0;
}
#else
static long live_blobs;

static int blob_from_buf(struct vaccel_blob **out, const uint8_t *buf, size_t size, bool own,
			 const char *name, const char *dir, bool randomize)
{
	if (!out || !buf || !size || !name || !*name)
		BADARG("vaccel_blob_from_buf", "bad arguments");
	if (dir || randomize)
		BADARG("vaccel_blob_from_buf", "the double keeps blobs in memory only");
	struct vaccel_blob *b = calloc(1, sizeof(*b));
	if (!b)
		return ENOMEM;
	b->type = 1; /* BUFFER */
	b->name = strdup(name);
	if (own) {
		if (copy_in((void **)&b->data, buf, size))
			return ENOMEM;
	} else {
		b->data = (uint8_t *)buf;
	}
	b->data_owned = own;
	b->size = size;
	*out = b;
	live_blobs++;
	return 0;
}

EXPORT int vaccel_blob_from_buf(struct vaccel_blob **out, const uint8_t *buf, size_t size,
				bool own, const char *name, const char *dir, bool randomize)
{
	return blob_from_buf(out, buf, size, own, name, dir, randomize);
}

static int blob_delete(struct vaccel_blob *b)
{
	if (!b)
		BADARG("vaccel_blob_delete", "NULL blob");
	if (b->data_owned)
		free(b->data);
	free(b->name);
	free(b);
	live_blobs--;
	return 0;
}

EXPORT int vaccel_blob_delete(struct vaccel_blob *b)
{
	return blob_delete(b);
}

EXPORT long vdouble_live_blobs(void)
{
	return live_blobs;
}

EXPORT int vaccel_resource_from_blobs(struct vaccel_resource **out,
				      const struct vaccel_blob **blobs, size_t nr_blobs, int type)
{
	if (!out || !blobs || !nr_blobs || type != 2)
		BADARG("vaccel_resource_from_blobs", "bad arguments (or not a MODEL)");
	struct vaccel_resource *res = resource_alloc(type);
	if (!res)
		return ENOMEM;
	struct model_slot *slot = model_slot(res);
	res->blobs = calloc(nr_blobs, sizeof(*res->blobs));
	for (size_t i = 0; i < nr_blobs; i++) {
		const struct vaccel_blob *b = blobs[i];
		if (!b || !b->data || !b->size || !b->name)
			BADARG("vaccel_resource_from_blobs", "invalid blob");
		/* copies, as the library does (vaccel_blob_from_buf of each) */
		if (blob_from_buf(&res->blobs[i], b->data, b->size, true, b->name, NULL, false))
			return ENOMEM;
		slot->size += b->size;
		slot->sum += checksum(b->data, b->size);
		record("vaccel_resource_from_blobs blob[%zu] name=%s size=%zu sum=%lu", i, b->name,
		       b->size, checksum(b->data, b->size));
	}
	res->nr_blobs = nr_blobs;
	*out = res;
	return 0;
}

EXPORT int vaccel_resource_sync(struct vaccel_resource *res, struct vaccel_session *sess)
{
	if (check_model("vaccel_resource_sync", sess, res, "resource"))
		return EINVAL;
	if (!res->nr_blobs)
		BADARG("vaccel_resource_sync", "cannot synchronize non-buffer resources");
	int code = fail_code("SYNC");
	if (code)
		return code;
	/* VDOUBLE_SYNC_BREAK: leave the resource as a broken library would, its
	 * blob array (=array) or first blob (=blob) NULL; delete puts it back */
	const char *brk = getenv("VDOUBLE_SYNC_BREAK");
	if (brk && !res->plugin_priv && !strcmp(brk, "array")) {
		res->plugin_priv = res->blobs;
		res->blobs = NULL;
		return 0;
	}
	if (brk && !res->plugin_priv && !strcmp(brk, "blob")) {
		res->plugin_priv = res->blobs[0];
		res->blobs[0] = NULL;
		return 0;
	}
	/* VDOUBLE_SYNC_WRITE: as if an operation had written into the first blob */
	const char *text = getenv("VDOUBLE_SYNC_WRITE");
	if (text) {
		size_t n = strlen(text) < res->blobs[0]->size ? strlen(text) : res->blobs[0]->size;
		memcpy(res->blobs[0]->data, text, n);
	}
	record("vaccel_resource_sync id=" ID_FMT " nr_blobs=%zu", sess->session_id, res->nr_blobs);
	return 0;
}
#endif

EXPORT int vaccel_resource_register(struct vaccel_resource *res, struct vaccel_session *sess)
{
	struct model_slot *slot = model_slot(res);
	if (!slot || !sess || !is_live(sess))
		BADARG("vaccel_resource_register", "unknown resource or session");
	if (slot->sess)
		BADARG("vaccel_resource_register", "already registered");
	slot->sess = sess;
	record("vaccel_resource_register id=" ID_FMT " kind=resource size=%zu sum=%lu",
	       sess->session_id, slot->size, slot->sum);
	return 0;
}

EXPORT int vaccel_resource_unregister(struct vaccel_resource *res, struct vaccel_session *sess)
{
	struct model_slot *slot = model_slot(res);
	if (!slot || slot->sess != sess)
		BADARG("vaccel_resource_unregister", "not registered with this session");
	slot->sess = NULL;
	record("vaccel_resource_unregister id=" ID_FMT, sess->session_id);
	return 0;
}

EXPORT int vaccel_resource_delete(struct vaccel_resource *res)
{
	struct model_slot *slot = model_slot(res);
	if (!slot || slot->sess)
		BADARG("vaccel_resource_delete", "unknown, or still registered");
	for (size_t i = 0; i < res->nr_paths; i++)
		free(res->paths[i]);
	free(res->paths);
#if VDOUBLE_ABI >= 8
	if (res->plugin_priv && !res->blobs) /* VDOUBLE_SYNC_BREAK=array */
		res->blobs = res->plugin_priv;
	else if (res->plugin_priv) /* VDOUBLE_SYNC_BREAK=blob */
		res->blobs[0] = res->plugin_priv;
	for (size_t i = 0; i < res->nr_blobs; i++)
		blob_delete(res->blobs[i]);
	free(res->blobs);
#endif
	slot->object = NULL;
	free(res);
	record("vaccel_resource_delete");
	return 0;
}
#endif /* 0.7 and current */

/* ---- tensors ------------------------------------------------------------------- */

struct vaccel_tf_tensor {
	void *data;
	size_t size;
	bool owned;
	int nr_dims;
	int64_t *dims; /* long long * in 0.5: the same on LP64 */
	int data_type;
};
_Static_assert(sizeof(struct vaccel_tf_tensor) == 40, "tf tensor size");
_Static_assert(offsetof(struct vaccel_tf_tensor, dims) == 24, "tf tensor dims offset");

struct vaccel_tflite_tensor {
	void *data;
	size_t size;
	bool owned;
	int nr_dims;
	int32_t *dims;
	int data_type;
};
_Static_assert(sizeof(struct vaccel_tflite_tensor) == 40, "tflite tensor size");

struct vaccel_torch_tensor {
	void *data;
	size_t size;
	bool owned;
	int64_t nr_dims;
	int64_t *dims;
	int data_type;
};
_Static_assert(sizeof(struct vaccel_torch_tensor) == 48, "torch tensor size");
_Static_assert(offsetof(struct vaccel_torch_tensor, nr_dims) == 24, "torch nr_dims offset");

struct vaccel_tf_node {
	char *name;
#if VDOUBLE_ABI == 5
	long long id;
#else
	int id;
#endif
};
_Static_assert(sizeof(struct vaccel_tf_node) == 16, "tf node size");

struct vaccel_tf_buffer {
	void *data;
	size_t size;
};

struct vaccel_tf_status {
	uint8_t error_code;
	char *message;
};

#define MAX_DIMS 64

/* A framework's tensor, whichever struct: the fields the double reads. */
struct any_tensor {
	void *data;
	size_t size;
	long nr_dims;
	int64_t dims[MAX_DIMS];
	int type;
};

static int read_tensor(const char *fn, int framework, const void *p, struct any_tensor *t)
{
	if (!p)
		BADARG(fn, "NULL tensor");
	if (framework == VDOUBLE_TFLITE) {
		const struct vaccel_tflite_tensor *x = p;
		t->data = x->data, t->size = x->size, t->nr_dims = x->nr_dims, t->type = x->data_type;
		if (t->nr_dims < 0 || t->nr_dims > MAX_DIMS || (t->nr_dims && !x->dims))
			BADARG(fn, "bad dims");
		for (long d = 0; d < t->nr_dims; d++)
			t->dims[d] = x->dims[d];
	} else if (framework == VDOUBLE_TORCH) {
		const struct vaccel_torch_tensor *x = p;
		t->data = x->data, t->size = x->size, t->nr_dims = (long)x->nr_dims,
		t->type = x->data_type;
		if (t->nr_dims < 0 || t->nr_dims > MAX_DIMS || (t->nr_dims && !x->dims))
			BADARG(fn, "bad dims");
		for (long d = 0; d < t->nr_dims; d++)
			t->dims[d] = x->dims[d];
	} else {
		const struct vaccel_tf_tensor *x = p;
		t->data = x->data, t->size = x->size, t->nr_dims = x->nr_dims, t->type = x->data_type;
		if (t->nr_dims < 0 || t->nr_dims > MAX_DIMS || (t->nr_dims && !x->dims))
			BADARG(fn, "bad dims");
		for (long d = 0; d < t->nr_dims; d++)
			t->dims[d] = x->dims[d];
	}
	if (t->size && !t->data)
		BADARG(fn, "tensor with a size and no data");
	return 0;
}

/* A new tensor of *framework* with t's contents, as a plugin makes its outputs. */
static void *new_tensor(int framework, const struct any_tensor *t)
{
	size_t size = framework == VDOUBLE_TORCH ? sizeof(struct vaccel_torch_tensor) :
						   sizeof(struct vaccel_tf_tensor);
	void *p = calloc(1, size);
	void *data = NULL;
	if (!p || copy_in(&data, t->data, t->size))
		return NULL;
	if (framework == VDOUBLE_TFLITE) {
		struct vaccel_tflite_tensor *x = p;
		x->dims = calloc((size_t)t->nr_dims + 1, sizeof(int32_t));
		for (long d = 0; d < t->nr_dims; d++)
			x->dims[d] = (int32_t)t->dims[d];
		x->data = data, x->size = t->size, x->owned = true, x->nr_dims = (int)t->nr_dims,
		x->data_type = t->type;
	} else if (framework == VDOUBLE_TORCH) {
		struct vaccel_torch_tensor *x = p;
		x->dims = calloc((size_t)t->nr_dims + 1, sizeof(int64_t));
		memcpy(x->dims, t->dims, (size_t)t->nr_dims * sizeof(int64_t));
		x->data = data, x->size = t->size, x->owned = true, x->nr_dims = t->nr_dims,
		x->data_type = t->type;
	} else {
		struct vaccel_tf_tensor *x = p;
		x->dims = calloc((size_t)t->nr_dims + 1, sizeof(int64_t));
		memcpy(x->dims, t->dims, (size_t)t->nr_dims * sizeof(int64_t));
		x->data = data, x->size = t->size, x->owned = true, x->nr_dims = (int)t->nr_dims,
		x->data_type = t->type;
	}
	pthread_mutex_lock(&lock);
	live_tensors++;
	pthread_mutex_unlock(&lock);
	return p;
}

static int free_tensor(const char *fn, int framework, void *p)
{
	if (!p)
		BADARG(fn, "NULL tensor");
	void *data, *dims;
	bool owned;
	if (framework == VDOUBLE_TORCH) {
		struct vaccel_torch_tensor *x = p;
		data = x->data, dims = x->dims, owned = x->owned;
	} else {
		struct vaccel_tf_tensor *x = p; /* TFLite's has the same layout */
		data = x->data, dims = x->dims, owned = x->owned;
	}
	if (owned)
		free(data);
	free(dims);
	free(p);
	record("%s", fn);
	pthread_mutex_lock(&lock);
	live_tensors--;
	pthread_mutex_unlock(&lock);
	return 0;
}

EXPORT long vdouble_live_tensors(void)
{
	return live_tensors;
}

#if VDOUBLE_ABI <= 6
EXPORT int vaccel_tf_tensor_destroy(struct vaccel_tf_tensor *t)
{
	return free_tensor("vaccel_tf_tensor_destroy", VDOUBLE_TF, t);
}
#else
EXPORT int vaccel_tf_tensor_delete(struct vaccel_tf_tensor *t)
{
	return free_tensor("vaccel_tf_tensor_delete", VDOUBLE_TF, t);
}
EXPORT int vaccel_tf_node_init(struct vaccel_tf_node *node, const char *name, int id)
{
	(void)node; (void)name; (void)id;
	return ENOTSUP; /* present so the binding can detect the node layout */
}
EXPORT int vaccel_tf_status_release(struct vaccel_tf_status *status)
{
	if (!status)
		BADARG("vaccel_tf_status_release", "NULL status");
	free(status->message);
	status->message = NULL;
	record("vaccel_tf_status_release");
	return 0;
}
EXPORT int vaccel_torch_tensor_delete(struct vaccel_torch_tensor *t)
{
	return free_tensor("vaccel_torch_tensor_delete", VDOUBLE_TORCH, t);
}
#endif
#if VDOUBLE_ABI == 6
EXPORT int vaccel_tflite_tensor_destroy(struct vaccel_tflite_tensor *t)
{
	return free_tensor("vaccel_tflite_tensor_destroy", VDOUBLE_TFLITE, t);
}
#elif VDOUBLE_ABI >= 7
EXPORT int vaccel_tflite_tensor_delete(struct vaccel_tflite_tensor *t)
{
	return free_tensor("vaccel_tflite_tensor_delete", VDOUBLE_TFLITE, t);
}
#endif

/* ---- model operations -------------------------------------------------------------- */

static const char *const framework_names[] = {"", "tf", "tflite", "torch"};

static int plugin_model(const char *fn, int op, int framework)
{
	int code = fail_code("MODEL");
	if (code)
		return code;
	vdouble_model_fn f = (vdouble_model_fn)op_table[op];
	if (!f)
		return ENOTSUP;
	(void)fn;
	return f(framework);
}

static void set_status(struct vaccel_tf_status *status, const char *text)
{
#if VDOUBLE_ABI >= 7
	status->message = strdup(text); /* released with vaccel_tf_status_release */
#else
	status->message = (char *)text; /* const char * in 0.5/0.6 */
#endif
	status->error_code = 0;
}

static int model_load(const char *fn, int framework, struct vaccel_session *sess, void *model,
		      const char *kind, struct vaccel_tf_status *status)
{
	if (check_model(fn, sess, model, kind))
		return EINVAL;
	if (framework == VDOUBLE_TF && !status)
		BADARG(fn, "NULL status");
	record("%s id=" ID_FMT " framework=%s", fn, sess->session_id, framework_names[framework]);
	int ret = plugin_model(fn, VDOUBLE_OP_MODEL_LOAD, framework);
	if (!ret && status)
		set_status(status, "Operation handled by noop plugin");
	return ret;
}

static int model_unload(const char *fn, int framework, struct vaccel_session *sess, void *model,
			const char *kind, struct vaccel_tf_status *status)
{
	if (check_model(fn, sess, model, kind))
		return EINVAL;
	if (framework == VDOUBLE_TF && !status)
		BADARG(fn, "NULL status");
	record("%s id=" ID_FMT " framework=%s", fn, sess->session_id, framework_names[framework]);
	int ret = plugin_model(fn, VDOUBLE_OP_MODEL_UNLOAD, framework);
	if (!ret && status)
		set_status(status, "Operation handled by noop plugin");
	return ret;
}

/* in/out are arrays of tensor pointers; in_nodes/out_nodes TensorFlow's only. */
static int model_run(const char *fn, int framework, struct vaccel_session *sess, void *model,
		     const char *kind, const struct vaccel_tf_buffer *options,
		     const struct vaccel_tf_node *in_nodes, void *const *in, int nr_in,
		     const struct vaccel_tf_node *out_nodes, void **out, int nr_out)
{
	if (check_model(fn, sess, model, kind))
		return EINVAL;
	if (nr_in < 0 || nr_out < 0)
		BADARG(fn, "negative tensor count");
	if ((nr_in && !in) || (nr_out && !out))
		BADARG(fn, "NULL tensor array");
	if (options && options->size && !options->data)
		BADARG(fn, "run options with a size and no data");
	record("%s id=" ID_FMT " framework=%s nr_in=%d nr_out=%d options=%zu options_sum=%lu", fn,
	       sess->session_id, framework_names[framework], nr_in, nr_out,
	       options ? options->size : (size_t)0,
	       options ? checksum(options->data, options->size) : 0ul);
	struct any_tensor *tensors = calloc((size_t)nr_in + 1, sizeof(*tensors));
	for (int i = 0; i < nr_in; i++) {
		if (read_tensor(fn, framework, in[i], &tensors[i])) {
			free(tensors);
			return EINVAL;
		}
		struct any_tensor *t = &tensors[i];
		char dims[256] = "";
		size_t used = 0;
		for (long d = 0; d < t->nr_dims && used < sizeof(dims) - 24; d++)
			used += (size_t)snprintf(dims + used, sizeof(dims) - used, "%s%" PRId64,
						 d ? "," : "", t->dims[d]);
		const char *node = "";
		if (framework == VDOUBLE_TF) {
			if (!in_nodes || !in_nodes[i].name) {
				free(tensors);
				BADARG(fn, "input node without a name");
			}
			node = in_nodes[i].name;
		}
		record("%s in[%d] type=%d dims=%s size=%zu sum=%lu node=%s", fn, i, t->type,
		       dims, t->size, checksum(t->data, t->size), node);
	}
	if (framework == VDOUBLE_TF)
		for (int i = 0; i < nr_out; i++) {
			if (!out_nodes || !out_nodes[i].name) {
				free(tensors);
				BADARG(fn, "output node without a name");
			}
			record("%s out_node[%d] name=%s id=%lld", fn, i, out_nodes[i].name,
			       (long long)out_nodes[i].id);
		}
	vdouble_run_fn run = (vdouble_run_fn)op_table[VDOUBLE_OP_MODEL_RUN];
	int ret = fail_code("MODEL");
	if (!ret)
		ret = run ? run(framework, nr_in, nr_out) : ENOTSUP;
	for (int i = 0; !ret && i < nr_out; i++) {
		out[i] = new_tensor(framework, &tensors[i]);
		if (!out[i])
			ret = ENOMEM;
	}
	free(tensors);
	/* VDOUBLE_RUN_BREAK: succeed with a broken last output, NULL (=null) or
	 * claiming 65 dims (=dims), as a broken plugin could */
	const char *brk = getenv("VDOUBLE_RUN_BREAK");
	if (!ret && nr_out && brk && !strcmp(brk, "null")) {
		free_tensor("break", framework, out[nr_out - 1]);
		out[nr_out - 1] = NULL;
	} else if (!ret && nr_out && brk && !strcmp(brk, "dims")) {
		if (framework == VDOUBLE_TORCH)
			((struct vaccel_torch_tensor *)out[nr_out - 1])->nr_dims = 65;
		else
			((struct vaccel_tf_tensor *)out[nr_out - 1])->nr_dims = 65;
	}
	return ret;
}

#define TF_KIND (VDOUBLE_ABI <= 6 ? "saved_model" : "resource")

#if VDOUBLE_ABI <= 7
EXPORT int vaccel_tf_session_load(struct vaccel_session *s, void *model,
				  struct vaccel_tf_status *status)
{
	return model_load("vaccel_tf_session_load", VDOUBLE_TF, s, model, TF_KIND, status);
}
EXPORT int vaccel_tf_session_delete(struct vaccel_session *s, void *model,
				    struct vaccel_tf_status *status)
{
	return model_unload("vaccel_tf_session_delete", VDOUBLE_TF, s, model, TF_KIND, status);
}
EXPORT int vaccel_tf_session_run(struct vaccel_session *s, const void *model,
				 const struct vaccel_tf_buffer *options,
				 const struct vaccel_tf_node *in_nodes, void *const *in, int nr_in,
				 const struct vaccel_tf_node *out_nodes, void **out, int nr_out,
				 struct vaccel_tf_status *status)
{
	if (!status)
		BADARG("vaccel_tf_session_run", "NULL status");
	int ret = model_run("vaccel_tf_session_run", VDOUBLE_TF, s, (void *)model, TF_KIND,
			    options, in_nodes, in, nr_in, out_nodes, out, nr_out);
	if (!ret)
		set_status(status, "Operation handled by noop plugin");
	return ret;
}
#else
EXPORT int vaccel_tf_model_load(struct vaccel_session *s, void *model,
				struct vaccel_tf_status *status)
{
	return model_load("vaccel_tf_model_load", VDOUBLE_TF, s, model, TF_KIND, status);
}
EXPORT int vaccel_tf_model_unload(struct vaccel_session *s, void *model,
				  struct vaccel_tf_status *status)
{
	return model_unload("vaccel_tf_model_unload", VDOUBLE_TF, s, model, TF_KIND, status);
}
EXPORT int vaccel_tf_model_run(struct vaccel_session *s, void *model,
			       const struct vaccel_tf_buffer *options,
			       const struct vaccel_tf_node *in_nodes, void *const *in, int nr_in,
			       const struct vaccel_tf_node *out_nodes, void **out, int nr_out,
			       struct vaccel_tf_status *status)
{
	if (!status)
		BADARG("vaccel_tf_model_run", "NULL status");
	int ret = model_run("vaccel_tf_model_run", VDOUBLE_TF, s, model, TF_KIND, options,
			    in_nodes, in, nr_in, out_nodes, out, nr_out);
	if (!ret)
		set_status(status, "Operation handled by noop plugin");
	return ret;
}
#endif

#if VDOUBLE_ABI == 6 || VDOUBLE_ABI == 7
#define TFLITE_KIND (VDOUBLE_ABI == 6 ? "single_model" : "resource")
EXPORT int vaccel_tflite_session_load(struct vaccel_session *s, void *model)
{
	return model_load("vaccel_tflite_session_load", VDOUBLE_TFLITE, s, model, TFLITE_KIND, NULL);
}
EXPORT int vaccel_tflite_session_delete(struct vaccel_session *s, void *model)
{
	return model_unload("vaccel_tflite_session_delete", VDOUBLE_TFLITE, s, model, TFLITE_KIND,
			    NULL);
}
EXPORT int vaccel_tflite_session_run(struct vaccel_session *s, const void *model,
				     void *const *in, int nr_in, void **out, int nr_out,
				     uint8_t *status)
{
	if (!status)
		BADARG("vaccel_tflite_session_run", "NULL status");
	*status = 0;
	return model_run("vaccel_tflite_session_run", VDOUBLE_TFLITE, s, (void *)model,
			 TFLITE_KIND, NULL, NULL, in, nr_in, NULL, out, nr_out);
}
#elif VDOUBLE_ABI >= 8
EXPORT int vaccel_tflite_model_load(struct vaccel_session *s, void *model)
{
	return model_load("vaccel_tflite_model_load", VDOUBLE_TFLITE, s, model, "resource", NULL);
}
EXPORT int vaccel_tflite_model_unload(struct vaccel_session *s, void *model)
{
	return model_unload("vaccel_tflite_model_unload", VDOUBLE_TFLITE, s, model, "resource",
			    NULL);
}
EXPORT int vaccel_tflite_model_run(struct vaccel_session *s, void *model, void *const *in,
				   int nr_in, void **out, int nr_out, uint8_t *status)
{
	if (!status)
		BADARG("vaccel_tflite_model_run", "NULL status");
	*status = 0;
	return model_run("vaccel_tflite_model_run", VDOUBLE_TFLITE, s, model, "resource", NULL,
			 NULL, in, nr_in, NULL, out, nr_out);
}
#endif

#if VDOUBLE_ABI == 7
EXPORT int vaccel_torch_jitload_forward(struct vaccel_session *s, const void *model,
					const struct vaccel_tf_buffer *options, void **in,
					int nr_in, void **out, int nr_out)
{
	return model_run("vaccel_torch_jitload_forward", VDOUBLE_TORCH, s, (void *)model,
			 "resource", options, NULL, in, nr_in, NULL, out, nr_out);
}
#elif VDOUBLE_ABI >= 8
EXPORT int vaccel_torch_model_load(struct vaccel_session *s, void *model)
{
	return model_load("vaccel_torch_model_load", VDOUBLE_TORCH, s, model, "resource", NULL);
}
EXPORT int vaccel_torch_model_run(struct vaccel_session *s, void *model,
				  const struct vaccel_tf_buffer *options, void *const *in,
				  int nr_in, void **out, int nr_out)
{
	return model_run("vaccel_torch_model_run", VDOUBLE_TORCH, s, model, "resource", options,
			 NULL, in, nr_in, NULL, out, nr_out);
}
#endif
