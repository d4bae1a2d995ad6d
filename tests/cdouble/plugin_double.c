/*
 * The plugin that goes with libvaccel_double.c, in the shape of a real vAccel
 * plugin: it exports `const struct vaccel_plugin *vaccel_plugin`, and its
 * init() registers its operations with register_plugin_functions(), a symbol
 * of the library.  Built for 0.5 it does not link the library (no DT_NEEDED),
 * like the real 0.5 plugins: that symbol is then found only once the library's
 * symbols are global, which they are not while the library's constructor runs.
 *
 * It answers like vAccel's noop plugin: the classification tag (followed by a
 * NUL and junk "JUNK...", so a binding that does not stop at the first NUL
 * shows it; VDOUBLE_TAG overrides the tag), model loads and unloads succeed,
 * a model run echoes input i as output i and refuses more outputs than inputs.
 */
#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vdouble_ops.h"

struct list_entry {
	struct list_entry *next, *prev;
};

struct vaccel_plugin_info {
	const char *name;
	const char *version;
	int (*init)(void);
	int (*fini)(void);
};

struct vaccel_plugin {
	void *dl_handle;
	struct list_entry entry;
	struct list_entry ops;
	struct vaccel_plugin_info *info;
};

struct vaccel_op {
	uint8_t type;
	void *func;
	struct vaccel_plugin *owner;
	struct list_entry plugin_entry;
	struct list_entry func_entry;
};

extern int register_plugin_functions(struct vaccel_op *plugin_ops, size_t nr_ops);

static void fill(unsigned char *out, size_t len, const char *text)
{
	size_t n = strlen(text);
	if (n >= len)
		n = len - 1;
	memcpy(out, text, n);
	out[n] = '\0';
	for (size_t i = n + 1; i < len && i < n + 9; i++)
		out[i] = "JUNKJUNK"[(i - n - 1) % 8];
}

static int classify(const void *img, size_t len_img, unsigned char *out_text,
		    size_t len_out_text, unsigned char *out_imgname, size_t len_out_imgname)
{
	(void)img;
	(void)len_img;
	const char *tag = getenv("VDOUBLE_TAG");
	fill(out_text, len_out_text, tag ? tag : "This is a dummy classification tag!");
	fill(out_imgname, len_out_imgname, "This is a dummy imgname!");
	return 0;
}

static int model_ok(int framework)
{
	return framework >= VDOUBLE_TF && framework <= VDOUBLE_TORCH ? 0 : EINVAL;
}

static int model_run(int framework, int nr_in, int nr_out)
{
	if (model_ok(framework))
		return EINVAL;
	return nr_out <= nr_in ? 0 : EINVAL; /* echo: one input per output */
}

static int init(void);
static int fini(void) { return 0; }

static struct vaccel_plugin_info info = {
	.name = "vdouble-noop",
	.version = "0.0.0",
	.init = init,
	.fini = fini,
};

static struct vaccel_plugin this_plugin = {
	.dl_handle = NULL,
	.entry = {&this_plugin.entry, &this_plugin.entry},
	.ops = {&this_plugin.ops, &this_plugin.ops},
	.info = &info,
};

__attribute__((visibility("default"))) const struct vaccel_plugin *vaccel_plugin = &this_plugin;

static struct vaccel_op ops[] = {
	{.type = VDOUBLE_OP_CLASSIFY, .func = (void *)classify, .owner = &this_plugin},
	{.type = VDOUBLE_OP_MODEL_LOAD, .func = (void *)model_ok, .owner = &this_plugin},
	{.type = VDOUBLE_OP_MODEL_UNLOAD, .func = (void *)model_ok, .owner = &this_plugin},
	{.type = VDOUBLE_OP_MODEL_RUN, .func = (void *)model_run, .owner = &this_plugin},
};

static int init(void)
{
	return register_plugin_functions(ops, sizeof(ops) / sizeof(ops[0]));
}
