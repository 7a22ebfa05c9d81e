"""Configuration of an exported looptrain model for Hugging Face transformers.

This file is copied verbatim into every `looptrain export --format hf` folder and
is loaded by `AutoConfig.from_pretrained(dir, trust_remote_code=True)`: it must
import nothing but transformers (no looptrain).

The architecture fields mirror looptrain's `ModelConfig`; the inference knobs
(`inference_depth`, `exit_policy`, `exit_threshold`, `exit_kv`) are settable per
load (`from_pretrained(dir, trust_remote_code=True, inference_depth=8)`) and per
call (`model(ids, depth=8)`, `model.generate(ids, depth=8, exit_policy=...)`).
"""

from transformers import PretrainedConfig

EXIT_POLICIES = ("none", "fixed", "max_prob", "margin", "logit_margin", "entropy", "kl", "gate")
EXIT_KV_POLICIES = ("copy", "compute")


class LoopTrainConfig(PretrainedConfig):
    """A looped LM: prelude (once) -> core (looped `loops` times at training) -> coda -> readout -> head.

    inference_depth:  loops run per token at inference (default: the trained `loops`);
                      deeper than trained extrapolates.
    exit_policy:      per-token early exit: none, or a confidence rule (fixed, max_prob,
                      margin, logit_margin, entropy, kl, gate) -- a token stops at the
                      first loop whose confidence is >= exit_threshold (looptrain eval's
                      semantics: threshold 0 exits at loop 1, > 1 never exits early).
    exit_kv:          what later tokens see of an exited token at the loops it skipped:
                      copy     its keys/values of the loop it exited at, reused for every
                           deeper loop (its state is frozen there; Huginn-style KV
                           sharing; costs nothing);
                      compute  the token keeps running to full depth so the cache is
                           exactly the full-depth one; only its prediction comes from the
                           exit (saves no compute: the reference for `copy`).
    initial_state_seed: for `initial_state: noise`, None samples fresh noise every call
                      (as in training); an int uses a fixed per-position noise table, so
                      decoding is deterministic and cached decoding equals recomputation.
    """

    model_type = "looptrain"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 20000,
        d_model: int = 512,
        n_heads: int = 8,
        prelude_layers: int = 0,
        core_layers: int = 8,
        coda_layers: int = 0,
        loops: int = 4,
        max_seq_len: int = 256,
        mlp_ratio: float = 4.0,
        norm: str = "rmsnorm",
        norm_eps: float = 1e-5,
        block_style: str = "prenorm",
        positions: str = "learned",
        rope_theta: float = 10000.0,
        tied_embeddings: bool = True,
        bias: bool = False,
        init_std: float = 0.02,
        injection: str = "none",
        initial_state: str = "embeddings",
        initial_state_std: float = 1.0,
        initial_state_seed=None,
        readout: str = "rmsnorm",
        alpha_init: float = 0.5,
        alpha_ref_rms: float = 1.0,
        recurrence: str = "residual",
        exit_gate: bool = False,
        inference_depth=None,
        exit_policy: str = "none",
        exit_threshold: float = 2.0,
        exit_kv: str = "copy",
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_heads = n_heads
        self.prelude_layers = prelude_layers
        self.core_layers = core_layers
        self.coda_layers = coda_layers
        self.loops = loops
        self.max_seq_len = max_seq_len
        self.mlp_ratio = mlp_ratio
        self.norm = norm
        self.norm_eps = norm_eps
        self.block_style = block_style
        self.positions = positions
        self.rope_theta = rope_theta
        self.tied_embeddings = tied_embeddings
        self.bias = bias
        self.init_std = init_std
        self.injection = injection
        self.initial_state = initial_state
        self.initial_state_std = initial_state_std
        self.initial_state_seed = initial_state_seed
        self.readout = readout
        self.alpha_init = alpha_init
        self.alpha_ref_rms = alpha_ref_rms
        self.recurrence = recurrence
        self.exit_gate = exit_gate
        self.inference_depth = loops if inference_depth is None else inference_depth
        self.exit_policy = exit_policy
        self.exit_threshold = exit_threshold
        self.exit_kv = exit_kv
        # Names other tools read (lm-eval's max length, generic utilities).
        self.hidden_size = d_model
        self.num_attention_heads = n_heads
        self.max_position_embeddings = max_seq_len
        self.num_hidden_layers = prelude_layers + core_layers + coda_layers
        # The head is tied by construction (one tensor), never by transformers' tying.
        kwargs["tie_word_embeddings"] = False
        kwargs.setdefault("bos_token_id", 1)
        kwargs.setdefault("eos_token_id", 2)
        super().__init__(**kwargs)
        self.check_inference_knobs(self.inference_depth, self.exit_policy, self.exit_kv)

    def check_inference_knobs(self, depth, exit_policy, exit_kv) -> None:
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"inference depth must be an integer >= 1 loop, got {depth!r}")
        if exit_policy not in EXIT_POLICIES:
            raise ValueError(f"unknown exit_policy {exit_policy!r}; use one of {', '.join(EXIT_POLICIES)}")
        if exit_policy == "gate" and not self.exit_gate:
            raise ValueError("exit_policy 'gate' needs a model trained with an exit gate (model.exit_gate=true)")
        if exit_kv not in EXIT_KV_POLICIES:
            raise ValueError(f"unknown exit_kv {exit_kv!r}; use one of {', '.join(EXIT_KV_POLICIES)}")
