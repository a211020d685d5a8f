// The C++ half of tools/check_cuda_fusion.py: llama.h alone, no Python, so that a crash in the bindings
// and one in llama.cpp can be told apart on a GPU machine.
//
//   probe MODEL logits TOKENS.i32 BATCH NGL OUT.f32   logits of every token, BATCH tokens per llama_decode,
//                                                       F32 KV cache, flash attention off
//   probe MODEL bench CTX GEN REPEATS NGL              one JSON line: prompt (CTX tokens, one llama_decode) and
//                                                       greedy generation (GEN tokens) tok/s of each timed run,
//                                                       after one warm-up run
#include "llama.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static void quiet(ggml_log_level level, const char * text, void *) {
    if (level == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

static int argmax(const float * v, int n) {
    int best = 0;
    for (int i = 1; i < n; ++i) {
        if (v[i] > v[best]) {
            best = i;
        }
    }
    return best;
}

// decode tokens[0..n) at positions pos0.., asking for the logits of every token or of the last only
static bool decode(llama_context * ctx, llama_batch & batch, const llama_token * tokens, int n, int pos0, bool all) {
    batch.n_tokens = n;
    for (int i = 0; i < n; ++i) {
        batch.token[i]     = tokens[i];
        batch.pos[i]       = pos0 + i;
        batch.n_seq_id[i]  = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i]    = all || i == n - 1;
    }
    return llama_decode(ctx, batch) == 0;
}

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL logits TOKENS BATCH NGL OUT | MODEL bench CTX GEN REPEATS NGL\n", argv[0]);
        return 2;
    }
    const std::string mode = argv[2];
    const bool logits_mode = mode == "logits";
    if ((logits_mode && argc != 7) || (!logits_mode && (mode != "bench" || argc != 7))) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    if (!getenv("PROBE_VERBOSE")) {
        llama_log_set(quiet, nullptr);
    }
    llama_backend_init();

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = atoi(argv[logits_mode ? 5 : 6]);
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "could not load %s\n", argv[1]);
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    std::vector<llama_token> tokens;
    int batch_size, gen = 0, repeats = 0;
    if (logits_mode) {
        FILE * f = fopen(argv[3], "rb");
        if (!f) {
            fprintf(stderr, "cannot read %s\n", argv[3]);
            return 1;
        }
        int32_t t;
        while (fread(&t, sizeof t, 1, f) == 1) {
            tokens.push_back(t);
        }
        fclose(f);
        batch_size = atoi(argv[4]);
    } else {
        const int n_ctx = atoi(argv[3]);
        gen = atoi(argv[4]);
        repeats = atoi(argv[5]);
        for (int i = 0; i < n_ctx; ++i) {
            tokens.push_back(1 + (int) ((i * 7919LL) % (n_vocab - 1)));   // deterministic, inside the vocabulary
        }
        batch_size = n_ctx;
    }

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = tokens.size() + gen + 16;
    cp.n_batch = cp.n_ubatch = batch_size;
    cp.n_seq_max = 1;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    if (logits_mode) {
        cp.type_k = cp.type_v = GGML_TYPE_F32;
    }
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "could not create a context\n");
        return 1;
    }
    llama_batch batch = llama_batch_init(batch_size, 0, 1);

    if (logits_mode) {
        std::vector<float> out;
        out.reserve(tokens.size() * n_vocab);
        for (size_t start = 0; start < tokens.size(); start += batch_size) {
            const int n = (int) std::min<size_t>(batch_size, tokens.size() - start);
            if (!decode(ctx, batch, tokens.data() + start, n, (int) start, true)) {
                fprintf(stderr, "llama_decode failed at %zu\n", start);
                return 1;
            }
            for (int i = 0; i < n; ++i) {
                const float * l = llama_get_logits_ith(ctx, i);
                out.insert(out.end(), l, l + n_vocab);
            }
        }
        FILE * f = fopen(argv[6], "wb");
        fwrite(out.data(), sizeof(float), out.size(), f);
        fclose(f);
        printf("{\"n_tokens\": %zu, \"n_vocab\": %d}\n", tokens.size(), n_vocab);
    } else {
        using clock = std::chrono::steady_clock;
        std::string pp_runs, tg_runs;
        for (int r = -1; r < repeats; ++r) {   // r = -1: warm-up
            llama_memory_clear(llama_get_memory(ctx), true);
            const auto t0 = clock::now();
            if (!decode(ctx, batch, tokens.data(), (int) tokens.size(), 0, false)) {
                fprintf(stderr, "llama_decode of the prompt failed\n");
                return 1;
            }
            llama_synchronize(ctx);
            const auto t1 = clock::now();
            int pos = (int) tokens.size();
            for (int g = 0; g < (r < 0 ? std::min(gen, 8) : gen); ++g) {
                llama_token next = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
                if (!decode(ctx, batch, &next, 1, pos++, true)) {
                    fprintf(stderr, "llama_decode of a generated token failed\n");
                    return 1;
                }
            }
            llama_synchronize(ctx);
            const auto t2 = clock::now();
            if (r >= 0) {
                const double pp = tokens.size() / std::chrono::duration<double>(t1 - t0).count();
                const double tg = gen / std::chrono::duration<double>(t2 - t1).count();
                pp_runs += (pp_runs.empty() ? "" : ", ") + std::to_string(pp);
                tg_runs += (tg_runs.empty() ? "" : ", ") + std::to_string(tg);
            }
        }
        printf("{\"pp_runs\": [%s], \"tg_runs\": [%s]}\n", pp_runs.c_str(), tg_runs.c_str());
    }
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
