"""Per-token early exit for decoder language models (SmolLM2-135M-Instruct).

`lm` loads the model from the registry package's GGUF file; `decode` is the greedy decode loop
with a KV cache, per-site ramps and synchronized deferral of skipped layers; `ramps` holds the
learned shortlist ramps and their training; `tuning` feeds tokens to `core`'s Controller.
Torch and transformers are imported by these modules, never by `core`.
"""
