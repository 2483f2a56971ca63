"""Engine configuration: what to load and how to size the cache and the batch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    """All knobs of one engine; ``LLM(...)`` keyword arguments and CLI flags map onto these."""

    model: str | None = None  # HF dir, .gguf file, or cached Hub id; None = packaged SmolLM2
    tokenizer: str | None = None  # defaults to the model's own
    # auto | float32 | bfloat16 | float16 (auto: float32 on CPU; on a GPU bf16, fp16 before sm80)
    dtype: str = "auto"
    device: str = "auto"  # auto | cpu | cuda[:N] (auto: the GPU when PyTorch sees one)
    seed: int = 0
    max_model_len: int | None = None  # defaults to the model's context length
    block_size: int = 16
    kv_cache_memory: float | None = None  # GiB for the K/V pools; None = a default for the device
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | float32 | bfloat16 | float16
    max_num_seqs: int = 256
    # Tokens per step: vLLM's CPU server default. Served on 2 cores, 32 x 1024-token prompts
    # at once ran 1680 against 1648 total tok/s at 1024 (six runs each), with a burst of 64 x 128
    # equal in throughput and median TTFT; a decode waits up to one step (about 1 s here) while
    # a long prompt prefills.
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    # fcfs (arrival order) | priority (a request's priority, lower first, then arrival; the
    # running request last in that order is preempted when blocks run out), as vLLM's
    scheduling_policy: str = "fcfs"
    enforce_eager: bool = False  # decode steps module by module (no CUDA graphs, no CPU stack)
    chat_template: str | None = None  # a template string or a path to a .jinja file
    # auto (the model directory's generation_config.json: its eos ids, and the sampling defaults
    # of requests that leave them out) | vllm (none) | a directory with a generation_config.json
    generation_config: str = "auto"
    # auto | generate | pooling (embeddings: /v1/embeddings, LLM.embed), as vLLM's --runner;
    # auto pools for a sentence-transformers directory or a headless ``*Model`` architecture
    runner: str = "auto"
    # overrides of the pooler the model directory describes: pooling_type (LAST | MEAN | CLS),
    # normalize (vLLM's --pooler-config)
    pooler_config: dict | None = None
    # Serve LoRA adapters (requests name them with a LoRARequest; the server's --lora-modules)
    # up to this rank, as vLLM's --enable-lora / --max-lora-rank
    enable_lora: bool = False
    max_lora_rank: int = 16
    # Speculative decoding, as vLLM's speculative_config: {"method": "ngram",
    # "num_speculative_tokens": k, "prompt_lookup_max": n, "prompt_lookup_min": m}
    speculative_config: dict | None = None
    # On a GPU: the share of its memory for weights and KV cache together (vLLM's); None: the
    # KV cache takes 85% of what is free once the weights are in. The CPU's budget is
    # kv_cache_memory.
    gpu_memory_utilization: float | None = None
    # False: every prompt runs whole in one step (the step budget grows to max_model_len)
    enable_chunked_prefill: bool = True
    # vLLM's: one device only here (1), and no code from a model's directory ever runs
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    trust_remote_code: bool = False
    # Set on the model's config before it loads (vLLM's hf_overrides), e.g. {"architectures":
    # ["Qwen3ForSequenceClassification"], "classifier_from_token": ["no", "yes"],
    # "is_original_qwen3_reranker": true} to serve Qwen3-Reranker as a cross-encoder
    hf_overrides: dict | None = None
    # The most alternatives a request's logprobs or prompt_logprobs may ask for (vLLM's
    # max_logprobs); -1: the whole vocabulary
    max_logprobs: int = 20
    # Over the generation config's sampling defaults, in its keys (vLLM's
    # override_generation_config), e.g. {"temperature": 0.5, "max_new_tokens": 256}
    override_generation_config: dict | None = None
    # The model's thinking markers (deepseek_r1 | qwen3, see reasoning_parsers.py), which a
    # request's thinking_token_budget needs; the server also splits answers with it
    reasoning_parser: str | None = None
