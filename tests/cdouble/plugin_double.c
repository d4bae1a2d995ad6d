/*
 * The plugin that goes with libvaccel_double.c: answers image classification
 * like vAccel's noop plugin.  It calls back into the library that loaded it
 * (vdouble_register_classify), so for the 0.5 build, which does not link the
 * plugin against the library, loading only works when the library was opened
 * RTLD_GLOBAL, as with the real 0.5.
 *
 * The tag is written followed by a NUL and junk ("JUNK..."), so a binding that
 * does not stop at the first NUL shows it.  VDOUBLE_TAG overrides the tag.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef int (*classify_fn)(const void *img, size_t len_img, unsigned char *out_text,
			   size_t len_out_text, unsigned char *out_imgname,
			   size_t len_out_imgname);
extern int vdouble_register_classify(classify_fn fn);

static void fill(unsigned char *out, size_t len, const char *text)
{
	size_t n = strlen(text);
	if (n >= len)
		n = len - 1;
	memcpy(out, text, n);
	out[n] = '\0';
	/* junk after the terminator, where a careless reader would look */
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

__attribute__((visibility("default"))) int vdouble_plugin_init(void)
{
	return vdouble_register_classify(classify);
}
