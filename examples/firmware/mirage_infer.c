/*
 * mirage_infer - run an exported mirage-edge model (OpenVINO IR or ONNX) from C.
 *
 * Uses only the OpenVINO C API (openvino/c/openvino.h, libopenvino_c), the interface a firmware
 * or device service links against. One call = read model -> compile -> one inference -> write.
 *
 *   mirage_infer MODEL INPUT OUTPUT [--uint8] [--device CPU] [--threads N] [--precision f32|bf16|f16|default]
 *
 * MODEL   model.xml (with model.bin beside it) or model.onnx from an artifact folder.
 * INPUT   raw little-endian file, N B-scans at the model's input size (N is taken from the size):
 *           default   float32 N x 1 x H x W, already preprocessed (values in [0, 1]), e.g. written
 *                     by `Predictor.preprocess()` in Python;
 *           --uint8   uint8 N x H x W at the model size; this program applies the per-image min-max
 *                     to [0, 1] (MIRAGE fine-tuning scaling). No resizing is done here: resize on the
 *                     device (or export the model at the sensor's size) first.
 * OUTPUT  raw float32 file of the model's first output (logits / features; a uint8/int64 mask output is
 *         converted to float32). The shape is printed to stdout as "output shape: d0 x d1 ...".
 *
 * --precision sets INFERENCE_PRECISION_HINT (default f32, as the artifact's metadata asks, so the
 * result matches the Python runtime); --threads sets INFERENCE_NUM_THREADS.
 *
 * Exit codes: 0 ok, 1 usage, 2 input file problems, 3 OpenVINO error.
 */
#include <openvino/c/openvino.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(call)                                                                              \
    do {                                                                                         \
        ov_status_e status_ = (call);                                                            \
        if (status_ != OK) {                                                                     \
            fprintf(stderr, "error: %s failed: %s (%s)\n", #call, ov_get_error_info(status_),    \
                    ov_get_last_err_msg());                                                      \
            rc = 3;                                                                              \
            goto cleanup;                                                                        \
        }                                                                                        \
    } while (0)

static void usage(const char* prog) {
    fprintf(stderr,
            "usage: %s MODEL INPUT OUTPUT [--uint8] [--device CPU] [--threads N] "
            "[--precision f32|bf16|f16|default]\n",
            prog);
}

/* Read a whole file into memory; returns NULL on failure (message printed). */
static unsigned char* read_file(const char* path, size_t* size) {
    FILE* f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "error: cannot open input %s\n", path);
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (n <= 0) {
        fprintf(stderr, "error: input %s is empty\n", path);
        fclose(f);
        return NULL;
    }
    unsigned char* buf = (unsigned char*)malloc((size_t)n);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        fprintf(stderr, "error: cannot read input %s\n", path);
        free(buf);
        fclose(f);
        return NULL;
    }
    fclose(f);
    *size = (size_t)n;
    return buf;
}

/* Per-image min-max of N uint8 images of `pixels` each into float [0, 1] (constant image -> 0). */
static void minmax_u8(const unsigned char* src, float* dst, size_t n, size_t pixels) {
    for (size_t i = 0; i < n; ++i) {
        const unsigned char* s = src + i * pixels;
        float* d = dst + i * pixels;
        unsigned char lo = 255, hi = 0;
        for (size_t j = 0; j < pixels; ++j) {
            if (s[j] < lo) lo = s[j];
            if (s[j] > hi) hi = s[j];
        }
        float range = (float)hi - (float)lo;
        for (size_t j = 0; j < pixels; ++j)
            d[j] = range > 0.0f ? ((float)s[j] - (float)lo) / range : 0.0f;
    }
}

int main(int argc, char** argv) {
    if (argc < 4) {
        usage(argv[0]);
        return 1;
    }
    const char* model_path = argv[1];
    const char* input_path = argv[2];
    const char* output_path = argv[3];
    const char* device = "CPU";
    const char* precision = "f32";
    const char* threads = NULL;
    int as_uint8 = 0;
    for (int i = 4; i < argc; ++i) {
        if (!strcmp(argv[i], "--uint8")) {
            as_uint8 = 1;
        } else if (!strcmp(argv[i], "--device") && i + 1 < argc) {
            device = argv[++i];
        } else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            threads = argv[++i];
        } else if (!strcmp(argv[i], "--precision") && i + 1 < argc) {
            precision = argv[++i];
        } else {
            usage(argv[0]);
            return 1;
        }
    }

    int rc = 0;
    ov_core_t* core = NULL;
    ov_model_t* model = NULL;
    ov_output_const_port_t* in_port = NULL;
    ov_partial_shape_t pshape = {0};
    int have_pshape = 0;
    ov_partial_shape_t static_shape = {0};
    int have_static = 0;
    ov_compiled_model_t* compiled = NULL;
    ov_infer_request_t* request = NULL;
    ov_shape_t in_shape = {0};
    int have_shape = 0;
    ov_tensor_t* in_tensor = NULL;
    ov_tensor_t* out_tensor = NULL;
    ov_shape_t out_shape = {0};
    int have_out_shape = 0;
    unsigned char* raw = NULL;
    float* input = NULL;
    float* converted = NULL;
    FILE* out = NULL;

    CHECK(ov_core_create(&core));
    CHECK(ov_core_read_model(core, model_path, NULL, &model));
    size_t n_inputs = 0;
    CHECK(ov_model_inputs_size(model, &n_inputs));
    if (n_inputs != 1) {
        fprintf(stderr, "error: %s has %zu inputs; this example runs single-input (B-scan) models\n", model_path,
                n_inputs);
        rc = 1;
        goto cleanup;
    }

    /* Per-sample shape C x H x W from the model; the batch axis may be dynamic. */
    CHECK(ov_model_const_input(model, &in_port));
    CHECK(ov_port_get_partial_shape(in_port, &pshape));
    have_pshape = 1;
    if (pshape.rank.min != 4 || pshape.rank.max != 4) {
        fprintf(stderr, "error: expected a rank-4 N x 1 x H x W input\n");
        rc = 2;
        goto cleanup;
    }
    int64_t chw[3];
    for (int d = 1; d < 4; ++d) {
        if (pshape.dims[d].min != pshape.dims[d].max || pshape.dims[d].min < 1) {
            fprintf(stderr, "error: input axis %d is dynamic; export with fixed H/W for this example\n", d);
            rc = 2;
            goto cleanup;
        }
        chw[d - 1] = pshape.dims[d].min;
    }
    size_t per_sample = (size_t)(chw[0] * chw[1] * chw[2]);

    size_t nbytes = 0;
    raw = read_file(input_path, &nbytes);
    if (!raw) {
        rc = 2;
        goto cleanup;
    }
    size_t elem = as_uint8 ? 1 : sizeof(float);
    if (nbytes % (per_sample * elem) != 0) {
        fprintf(stderr, "error: %s holds %zu bytes, not a multiple of one %s sample (%lld x %lld x %lld = %zu bytes)\n",
                input_path, nbytes, as_uint8 ? "uint8" : "float32", (long long)chw[0], (long long)chw[1],
                (long long)chw[2], per_sample * elem);
        rc = 2;
        goto cleanup;
    }
    size_t batch = nbytes / (per_sample * elem);
    int64_t batch_min = pshape.dims[0].min, batch_max = pshape.dims[0].max;
    if ((int64_t)batch < batch_min || (batch_max >= 0 && (int64_t)batch > batch_max)) {
        fprintf(stderr, "error: %zu sample(s) in %s, the model takes a batch of %lld..%lld\n", batch, input_path,
                (long long)batch_min, (long long)batch_max);
        rc = 2;
        goto cleanup;
    }
    if (as_uint8) {
        input = (float*)malloc(batch * per_sample * sizeof(float));
        if (!input) {
            rc = 2;
            goto cleanup;
        }
        minmax_u8(raw, input, batch * (size_t)chw[0], (size_t)(chw[1] * chw[2]));
    } else {
        input = (float*)raw;
        raw = NULL;
        for (size_t j = 0; j < batch * per_sample; ++j) {
            if (!isfinite(input[j])) {
                fprintf(stderr, "error: %s has a non-finite value at element %zu\n", input_path, j);
                rc = 2;
                goto cleanup;
            }
        }
    }

    /* Compile at this batch, as the Python runtime does: on a static shape OpenVINO may pick other INT8
       kernels than on the dynamic batch axis (logits differ by up to ~1e-2), and the same shape on both
       sides keeps this program's output equal to mirage_edge.runtime's. It is also faster. */
    int64_t dims[4] = {(int64_t)batch, chw[0], chw[1], chw[2]};
    CHECK(ov_partial_shape_create_static(4, dims, &static_shape));
    have_static = 1;
    CHECK(ov_model_reshape_single_input(model, static_shape));

    if (threads && strcmp(precision, "default")) {
        CHECK(ov_core_compile_model(core, model, device, 4, &compiled, ov_property_key_hint_inference_precision,
                                    precision, ov_property_key_inference_num_threads, threads));
    } else if (threads) {
        CHECK(ov_core_compile_model(core, model, device, 2, &compiled, ov_property_key_inference_num_threads,
                                    threads));
    } else if (strcmp(precision, "default")) {
        CHECK(ov_core_compile_model(core, model, device, 2, &compiled, ov_property_key_hint_inference_precision,
                                    precision));
    } else {
        CHECK(ov_core_compile_model(core, model, device, 0, &compiled));
    }
    CHECK(ov_compiled_model_create_infer_request(compiled, &request));

    CHECK(ov_shape_create(4, dims, &in_shape));
    have_shape = 1;
    CHECK(ov_tensor_create_from_host_ptr(F32, in_shape, input, &in_tensor));
    CHECK(ov_infer_request_set_input_tensor(request, in_tensor));
    CHECK(ov_infer_request_infer(request));

    CHECK(ov_infer_request_get_output_tensor_by_index(request, 0, &out_tensor));
    ov_element_type_e type;
    size_t count = 0;
    void* data = NULL;
    CHECK(ov_tensor_get_element_type(out_tensor, &type));
    CHECK(ov_tensor_get_size(out_tensor, &count));
    CHECK(ov_tensor_get_shape(out_tensor, &out_shape));
    have_out_shape = 1;
    CHECK(ov_tensor_data(out_tensor, &data));
    const float* values = (const float*)data;
    if (type != F32) {
        converted = (float*)malloc(count * sizeof(float));
        if (!converted) {
            rc = 3;
            goto cleanup;
        }
        for (size_t j = 0; j < count; ++j) {
            if (type == I64)
                converted[j] = (float)((const int64_t*)data)[j];
            else if (type == I32)
                converted[j] = (float)((const int32_t*)data)[j];
            else if (type == U8)
                converted[j] = (float)((const uint8_t*)data)[j];
            else {
                fprintf(stderr, "error: unsupported output element type %d\n", (int)type);
                rc = 3;
                goto cleanup;
            }
        }
        values = converted;
    }
    out = fopen(output_path, "wb");
    if (!out || fwrite(values, sizeof(float), count, out) != count) {
        fprintf(stderr, "error: cannot write %s\n", output_path);
        rc = 2;
        goto cleanup;
    }
    printf("output shape:");
    for (int64_t d = 0; d < out_shape.rank; ++d) printf("%s%lld", d ? " x " : " ", (long long)out_shape.dims[d]);
    printf("\nbatch: %zu, wrote %zu float32 values to %s\n", batch, count, output_path);

cleanup:
    if (out) fclose(out);
    free(converted);
    if (have_out_shape) ov_shape_free(&out_shape);
    if (out_tensor) ov_tensor_free(out_tensor);
    if (in_tensor) ov_tensor_free(in_tensor);
    if (have_shape) ov_shape_free(&in_shape);
    if (request) ov_infer_request_free(request);
    if (compiled) ov_compiled_model_free(compiled);
    if (have_static) ov_partial_shape_free(&static_shape);
    if (have_pshape) ov_partial_shape_free(&pshape);
    if (in_port) ov_output_const_port_free(in_port);
    if (model) ov_model_free(model);
    if (core) ov_core_free(core);
    free(input);
    free(raw);
    return rc;
}
