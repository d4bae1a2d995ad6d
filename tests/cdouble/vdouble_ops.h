/* The operations a plugin double registers with the libvaccel double, and the
 * signatures of the functions it gives for them.  (The real vAccel numbers its
 * ops differently per release; the doubles only need to agree with each other.) */
#pragma once
#include <stddef.h>

enum {
	VDOUBLE_OP_CLASSIFY = 1,
	VDOUBLE_OP_MODEL_LOAD, /* any framework: int (*)(int framework) */
	VDOUBLE_OP_MODEL_UNLOAD,
	VDOUBLE_OP_MODEL_RUN, /* int (*)(int framework, int nr_in, int nr_out) */
	VDOUBLE_OP_MAX
};

enum { VDOUBLE_TF = 1, VDOUBLE_TFLITE, VDOUBLE_TORCH };

typedef int (*vdouble_classify_fn)(const void *img, size_t len_img, unsigned char *out_text,
				   size_t len_out_text, unsigned char *out_imgname,
				   size_t len_out_imgname);
typedef int (*vdouble_model_fn)(int framework);
typedef int (*vdouble_run_fn)(int framework, int nr_in, int nr_out);
