/* The text room: CLIP's byte-level BPE tokenizer and CLIPTextModel, loaded from the Hugging Face
 * layouts Stable-Diffusion pipelines ship (tokenizer/ and text_encoder/), turning prompts into
 * the hidden states a UNet cross-attends to. */
#ifndef DENOISED_CLIP_H
#define DENOISED_CLIP_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "pool.h"
#include "safetensors.h"

/* Longest prompt accepted, in UTF-8 bytes: BPE is quadratic in a word's length, and a prompt
 * this long is far past the 75 tokens the encoder sees. */
#define CLIP_MAX_PROMPT_BYTES 16384

/* ---------- tokenizer ---------- */

typedef struct clip_tokenizer clip_tokenizer;

/* Loads vocab.json and merges.txt from dir, and the pad token and model_max_length from
 * special_tokens_map.json / tokenizer_config.json when present (defaults: pad with the end
 * token, 77). ERR_IO / ERR_FORMAT naming the file and what is wrong. */
int clip_tokenizer_new(const char *dir, clip_tokenizer **out, err *e);
/* The same with the special tokens and model_max_length from config (a tokenizer_config.json's
 * object, as a single-file checkpoint's converter makes it) in place of dir's own files. */
int clip_tokenizer_new_from(const char *dir, const json_t *config, clip_tokenizer **out, err *e);
void clip_tokenizer_free(clip_tokenizer *t);

/* Sequence length of clip_tokenize's output (model_max_length). */
int clip_tokenizer_length(const clip_tokenizer *t);
int64_t clip_tokenizer_pad_id(const clip_tokenizer *t);

/* ids[clip_tokenizer_length(t)] = start token, the prompt's tokens (truncated so the end token
 * fits), end token, pad tokens. *ntokens receives how many prompt tokens were kept, *truncated
 * whether any were dropped (either may be NULL). text need not be NUL-terminated. ERR_INVALID
 * for invalid UTF-8, a NUL byte or a prompt over CLIP_MAX_PROMPT_BYTES. */
int clip_tokenize(const clip_tokenizer *t, const char *text, size_t len, int64_t *ids, int *ntokens,
                  int *truncated, err *e);

/* The clean-up alone, as CLIP applies it before the pre-split (our ftfy subset, HTML unescape
 * twice, whitespace collapse, strip, lower-case): malloc'ed NUL-terminated UTF-8 in *out. */
int clip_clean_text(const char *text, size_t len, char **out, err *e);

/* ---------- text model ---------- */

typedef enum { CLIP_ACT_QUICK_GELU, CLIP_ACT_GELU } clip_act;

typedef struct clip_text_config {
  int vocab_size, hidden_size, intermediate_size, layers, heads, max_positions;
  clip_act act;
  float eps;
} clip_text_config;

typedef struct clip_text_model clip_text_model;

/* Loads config.json and model.safetensors (F32, F16 or BF16) of a transformers CLIPTextModel
 * (or CLIPTextModelWithProjection, whose projection is not used) from dir. */
int clip_text_new(const char *dir, clip_text_model **out, err *e);
/* The same from a parsed config.json and the tensors under transformers' names (a single-file
 * checkpoint's converted view); source names them in errors. The weights are copied: weights
 * may be closed afterwards. */
int clip_text_new_from(const json_t *config, const st_file *weights, const char *source,
                       clip_text_model **out, err *e);
/* A fresh model of config (a CLIPTextModel config.json's object) for training, its weights
 * drawn from seed as transformers initialises them (see init_std in clip_text.c) with the
 * engine's counter-based generator. */
int clip_text_init(const json_t *config, uint64_t seed, clip_text_model **out, err *e);
void clip_text_free(clip_text_model *m);
const clip_text_config *clip_text_config_of(const clip_text_model *m);

/* Every weight in one block of *count floats (what a backward's gradient buffer mirrors), and
 * its i-th tensor: transformers' name, offset and floats in the block; NULL past the last. The
 * order: token and position embeddings, final layer norm, then per layer layer_norm1, 2, q, k,
 * v, out projections (weight, bias), fc1, fc2. The name is valid until the next call. */
float *clip_text_weights(const clip_text_model *m, size_t *count);
const char *clip_text_tensor(const clip_text_model *m, int i, size_t *offset, size_t *count);
/* Tensor i's shape as transformers stores it (shape[0..ndim)); returns ndim, 0 past the last. */
int clip_text_tensor_shape(const clip_text_model *m, int i, int64_t shape[2]);
/* Packs the projections again from the block's values, after an optimizer changed them. No
 * encode may run meanwhile. ERR_NOMEM. */
int clip_text_repack(clip_text_model *m, err *e);

/* hidden[n][len][hidden_size] for the token ids[n][len] (len <= max_positions), causal
 * attention. clip_skip counts as AUTOMATIC1111 does: 1 is the last layer's output, N > 1 the
 * output N - 1 layers earlier; both through the final layer norm (diffusers' clip_skip is ours
 * minus one). Deterministic: the same ids give the same bits whatever n, p or the threads. */
int clip_text_encode(const clip_text_model *m, const int64_t *ids, int n, int len, int clip_skip,
                     float *hidden, pool *p, err *e);

#endif
