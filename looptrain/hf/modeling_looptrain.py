"""A looptrain looped LM as a Hugging Face causal LM, with a per-(loop, layer) KV cache.

This file is copied verbatim into every `looptrain export --format hf` folder and
is loaded by `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`:
it imports only torch and transformers. The parameter names are looptrain's own
(`tok_embed`, `core.layers.0.attn.qkv`, ...), so one `model.safetensors` serves
both this class and `looptrain.checkpoint.load_exported`, and the forward pass
repeats looptrain's operations in the same order (same logits to fp32 rounding).

Inference depth and early exit
    `depth` (default `config.inference_depth`, itself the trained loop count) loops
    run per token. With `exit_policy` other than "none" every loop's exit is read
    out and a token stops at the first loop whose confidence reaches
    `exit_threshold`; its logits are that exit's. `exit_kv` says what later tokens
    attend to at the loops an exited token skipped (see `LoopTrainConfig`).

KV cache
    Every attention layer run gets its own cache slot, keyed by (stage, loop,
    layer): the prelude once, the core once per loop, the coda once per exit it is
    read at. Slots live in a transformers `Cache` (a lazily growing `DynamicCache`
    by default) in the order they are first used. An entry a token never computed
    (it exited early, or an earlier call ran fewer loops) is filled, when a later
    token needs it, with the same layer's entry of the nearest shallower loop: the
    token's state stays where it stopped, so its keys and values do too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_looptrain import LoopTrainConfig

SlotKey = tuple


# ------------------------------------------------------------------ building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def build_norm(cfg: LoopTrainConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotary_tables(head_dim: int, length: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (length, head_dim/2), computed in float64 and stored in float32 as looptrain does."""
    half = head_dim // 2
    inv_freq = theta ** (-torch.arange(half, device=device, dtype=torch.float64) / half)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends into a buffer with spare capacity instead of concatenating.

    `torch.cat` copies the whole cache of every (loop, layer) slot at every token, which
    at K loops is K times the copying of a plain transformer; here `keys`/`values` are
    views of buffers that double when full, so a token writes only its own entries.
    A cache rewritten from outside (beam reordering, cropping) is adopted as it is.
    """

    def update(self, key_states, value_states, cache_kwargs=None):
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        length = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        buffers = getattr(self, "_buffers_kv", None)
        if buffers is None or length and buffers[0].data_ptr() != self.keys.data_ptr():
            buffers = None  # first use, or the cache was replaced from outside
        need = length + key_states.shape[-2]
        if buffers is None or need > buffers[0].shape[-2]:
            capacity = max(2 * need, 64)
            shape = (*key_states.shape[:-2], capacity, key_states.shape[-1])
            new = (key_states.new_empty(shape), value_states.new_empty(shape))
            if length:
                new[0][..., :length, :] = self.keys
                new[1][..., :length, :] = self.values
            buffers = new
            self._buffers_kv = buffers
        buffers[0][..., length:need, :] = key_states
        buffers[1][..., length:need, :] = value_states
        self.keys, self.values = buffers[0][..., :need, :], buffers[1][..., :need, :]
        return self.keys, self.values


class _Pass:
    """What one forward call shares with every attention layer: positions, mask, cache, frozen tokens."""

    def __init__(self, cache: Optional[Cache], past: int, rope, mask, is_causal: bool, record: bool) -> None:
        self.cache = cache
        self.past = past
        self.rope = rope
        self.mask = mask
        self.is_causal = is_causal
        self.record = record  # keep this call's own keys/values per slot (for frozen tokens)
        self.chunk_kv: dict = {}
        self.frozen: Optional[torch.Tensor] = None  # (B, T) tokens that already exited
        self.frozen_from: Optional[SlotKey] = None

    # slots ------------------------------------------------------------------

    def _slots(self) -> dict:
        slots = getattr(self.cache, "_looptrain_slots", None)
        if slots is None:
            slots = {}
            self.cache._looptrain_slots = slots
        return slots

    def _layer(self, key: SlotKey):
        """The cache layer of a slot (None if the slot was never used)."""
        idx = self._slots().get(key)
        return None if idx is None else self.cache.layers[idx]

    @staticmethod
    def _length(layer) -> int:
        if layer is None or not getattr(layer, "is_initialized", False) or layer.keys is None:
            return 0
        return layer.keys.shape[-2]

    def _fallbacks(self, key: SlotKey):
        stage = key[0]
        if stage == "core":
            _, loop, layer = key
            return [("core", j, layer) for j in range(loop - 1, 0, -1)]
        if stage == "coda":
            _, loop, layer = key
            exits = sorted({k[1] for k in self._slots() if k[0] == "coda" and k[2] == layer})
            shallower = [j for j in exits if j < loop][::-1]
            deeper = [j for j in exits if j > loop]
            return [("coda", j, layer) for j in shallower + deeper]
        return []

    def _fill_missing(self, key: SlotKey, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries 0..past-1 of this slot: copy those the earlier tokens never computed."""
        have = self._length(self._layer(key))
        if have >= self.past:
            return k, v
        for source_key in self._fallbacks(key):
            source = self._layer(source_key)
            if self._length(source) >= self.past:
                k = torch.cat((source.keys[..., have:self.past, :], k), dim=-2)
                v = torch.cat((source.values[..., have:self.past, :], v), dim=-2)
                return k, v
        raise RuntimeError(f"the KV cache has no entries for {key} of the earlier tokens; start a new cache")

    def update(self, key: SlotKey, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's keys/values over the whole sequence, after caching this call's."""
        if self.frozen is not None and self.frozen_from is not None:
            prev = self.chunk_kv.get(key[:1] + (self.frozen_from,) + key[2:])
            if prev is not None:
                keep = self.frozen[:, None, :, None]
                k, v = torch.where(keep, prev[0], k), torch.where(keep, prev[1], v)
        if self.record:
            self.chunk_kv[key] = (k, v)
        if self.cache is None:
            return k, v
        k, v = self._fill_missing(key, k, v)
        slots = self._slots()
        if key not in slots:
            slots[key] = len(slots)
        idx = slots[key]
        while len(self.cache.layers) <= idx:
            self.cache.layers.append(GrowingLayer())
        return self.cache.update(k, v, idx)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: LoopTrainConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor, ctx: _Pass, slot: SlotKey) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if ctx.rope is not None:
            cos, sin = ctx.rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = ctx.update(slot, k, v)
        if ctx.mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=ctx.is_causal)
        return self.out(y.transpose(1, 2).reshape(batch, seq, width))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LoopTrainConfig) -> None:
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.w1 = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """prenorm: h + attn(norm(h)); sandwich: h + norm(attn(norm(h))) -- then the same for the MLP."""

    def __init__(self, cfg: LoopTrainConfig) -> None:
        super().__init__()
        self.attn_norm = build_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = build_norm(cfg)
        self.mlp = SwiGLU(cfg)
        sandwich = cfg.block_style == "sandwich"
        self.attn_out_norm = build_norm(cfg) if sandwich else nn.Identity()
        self.mlp_out_norm = build_norm(cfg) if sandwich else nn.Identity()

    def forward(self, h: torch.Tensor, ctx: _Pass, slot: SlotKey) -> torch.Tensor:
        h = h + self.attn_out_norm(self.attn(self.attn_norm(h), ctx, slot))
        return h + self.mlp_out_norm(self.mlp(self.mlp_norm(h)))


class NoInjection(nn.Module):
    def forward(self, h, e):
        return h


class AddInjection(nn.Module):
    def forward(self, h, e):
        return h + e


class ConcatInjection(nn.Module):
    def __init__(self, cfg: LoopTrainConfig) -> None:
        super().__init__()
        self.adapter = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, h, e):
        return self.adapter(torch.cat((h, e), dim=-1))


class ContractiveInjection(nn.Module):
    """exp(-delta*A) * h + delta * (B e), A = exp(a_log), delta = softplus(dt)."""

    def __init__(self, cfg: LoopTrainConfig) -> None:
        super().__init__()
        self.a_log = nn.Parameter(torch.zeros(cfg.d_model))
        self.dt = nn.Parameter(torch.zeros(cfg.d_model))
        self.input_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, h, e):
        decay = torch.exp(-F.softplus(self.dt) * torch.exp(self.a_log))
        return decay.to(h.dtype) * h + F.softplus(self.dt).to(h.dtype) * self.input_proj(e)


INJECTIONS = {"none": NoInjection, "add": AddInjection, "concat": ConcatInjection, "contractive": ContractiveInjection}


class SkipDecay(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.param = nn.Parameter(torch.zeros(d_model))

    def forward(self) -> torch.Tensor:
        return torch.exp(-F.softplus(self.param))


class LoopCore(nn.Module):
    def __init__(self, cfg: LoopTrainConfig) -> None:
        super().__init__()
        kind = INJECTIONS[cfg.injection]
        self.injection = kind(cfg) if kind in (ConcatInjection, ContractiveInjection) else kind()
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.core_layers))
        self.skip_decay = SkipDecay(cfg.d_model) if cfg.recurrence == "contractive" else None

    def forward(self, h: torch.Tensor, inject, ctx: _Pass, loop: int) -> torch.Tensor:
        x = self.injection(h, inject)
        y = x
        for i, layer in enumerate(self.layers):
            y = layer(y, ctx, ("core", loop, i))
        if self.skip_decay is None:
            return y
        return y - (1.0 - self.skip_decay().to(x.dtype)) * x


class NormReadout(nn.Module):
    def __init__(self, cfg: LoopTrainConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, h, last_exit: bool):
        return self.norm(h)


class RawReadout(nn.Module):
    def forward(self, h, last_exit: bool):
        return h


class FinalOnlyReadout(NormReadout):
    def forward(self, h, last_exit: bool):
        return self.norm(h) if last_exit else h


class AlphaReadout(nn.Module):
    def __init__(self, cfg: LoopTrainConfig) -> None:
        super().__init__()
        self.log_ref = math.log(cfg.alpha_ref_rms)
        self.eps = cfg.norm_eps
        self.alpha_logit = nn.Parameter(torch.zeros(()))

    def forward(self, h, last_exit: bool):
        log_s = 0.5 * torch.log(h.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        factor = torch.exp((1.0 - torch.sigmoid(self.alpha_logit)) * (self.log_ref - log_s))
        return h * factor.to(h.dtype)


READOUTS = {"rmsnorm": NormReadout, "raw": RawReadout, "final_only": FinalOnlyReadout, "alpha": AlphaReadout}


# ------------------------------------------------------------------ exit rules


def exit_confidence(policy: str, logits: torch.Tensor, prev_logp, loop: int, depth: int, gate_state):
    """Confidence in [0, 1] per token at this exit (looptrain eval's definitions) and the new log-probs."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if policy == "fixed":
        return torch.full(logits.shape[:-1], loop / depth, device=logits.device), logp
    if policy == "gate":
        return 1.0 - gate_state, logp
    vocab = logp.shape[-1]
    top = logp.topk(min(2, vocab), dim=-1).values
    if policy == "max_prob":
        return top[..., 0].exp(), logp
    if policy == "margin":
        return top[..., 0].exp() - (top[..., 1].exp() if vocab > 1 else 0.0), logp
    if policy == "logit_margin":
        return 1.0 - torch.exp(-(top[..., 0] - top[..., 1])), logp
    if policy == "entropy":
        entropy = -(logp.exp() * logp).sum(dim=-1)
        return (1.0 - entropy / math.log(max(vocab, 2))).clamp(0.0, 1.0), logp
    if policy == "kl":
        if prev_logp is None:
            return torch.zeros(logits.shape[:-1], device=logits.device), logp
        kl = (logp.exp() * (logp - prev_logp)).sum(dim=-1).clamp_min(0.0)
        return torch.exp(-kl), logp
    raise ValueError(f"unknown exit policy {policy!r}")


# ------------------------------------------------------------------ the model


@dataclass
class LoopTrainCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus, for early-exit calls, the loop each token exited at."""

    exit_loops: Optional[torch.LongTensor] = None
    loops_run: Optional[int] = None


class LoopTrainPreTrainedModel(PreTrainedModel):
    config_class = LoopTrainConfig
    base_model_prefix = "looptrain"
    supports_gradient_checkpointing = False
    _no_split_modules = ["TransformerBlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class LoopTrainForCausalLM(LoopTrainPreTrainedModel, GenerationMixin):
    def __init__(self, config: LoopTrainConfig) -> None:
        super().__init__(config)
        cfg = config
        d = cfg.d_model
        self.tok_embed = nn.Embedding(cfg.vocab_size, d)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, d) if cfg.positions == "learned" else None
        self.prelude = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.prelude_layers))
        self.core = LoopCore(cfg)
        self.coda = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.coda_layers))
        self.readout = READOUTS[cfg.readout](cfg) if cfg.readout != "raw" else RawReadout()
        self.carry_norm = RMSNorm(d, cfg.norm_eps) if cfg.recurrence == "rmsnorm" else None
        self.exit_gate = nn.Linear(d, 1) if cfg.exit_gate else None
        self.head = None if cfg.tied_embeddings else nn.Linear(d, cfg.vocab_size, bias=False)
        self._rope_tables: dict = {}
        self._noise_table: dict = {}
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # forward() makes its own lazily growing DynamicCache: the number of slots
        # depends on the depth of each call, not on a fixed layer count.
        return False

    def get_input_embeddings(self):
        return self.tok_embed

    def set_input_embeddings(self, value):
        self.tok_embed = value

    def get_output_embeddings(self):
        return self.head

    @property
    def head_weight(self) -> torch.Tensor:
        return self.tok_embed.weight if self.head is None else self.head.weight

    # --------------------------------------------------------------- pieces

    def _rope(self, positions: torch.Tensor):
        if self.config.positions != "rope":
            return None
        needed = int(positions.max()) + 1
        length = max(self.config.max_seq_len, needed)
        key = (length, positions.device)
        if key not in self._rope_tables:
            self._rope_tables = {key: rotary_tables(self.config.d_model // self.config.n_heads, length,
                                                    self.config.rope_theta, positions.device)}
        cos, sin = self._rope_tables[key]
        return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # (B|1, 1, T, half)

    def _initial_state(self, e: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kind = self.config.initial_state
        if kind == "embeddings":
            return e
        if kind == "zeros":
            return torch.zeros_like(e)
        seed = self.config.initial_state_seed
        if seed is None:
            return torch.randn_like(e) * self.config.initial_state_std
        key = (seed, e.device, e.dtype)
        if key not in self._noise_table:
            gen = torch.Generator().manual_seed(int(seed))
            table = torch.randn(self.config.max_seq_len, e.shape[-1], generator=gen)
            self._noise_table = {key: table.to(device=e.device, dtype=e.dtype)}
        table = self._noise_table[key]
        return table[positions % table.shape[0]].expand_as(e) * self.config.initial_state_std

    def _exit_features(self, h: torch.Tensor, loop: int, last_exit: bool, ctx: _Pass) -> torch.Tensor:
        x = h
        for i, block in enumerate(self.coda):
            x = block(x, ctx, ("coda", loop, i))
        return self.readout(x, last_exit)

    @staticmethod
    def _mask(attention_mask, past: int, seq: int, device):
        """(mask, is_causal) for SDPA: None + is_causal where a plain causal mask does."""
        total = past + seq
        padded = attention_mask is not None and not bool(attention_mask[:, -total:].bool().all())
        if not padded and (seq == 1 or past == 0):
            return None, seq > 1
        q_pos = torch.arange(past, total, device=device)[:, None]
        k_pos = torch.arange(total, device=device)[None, :]
        mask = (k_pos <= q_pos)[None, None]
        if padded:
            valid = attention_mask[:, -total:].bool()[:, None, None, :]
            mask = (mask & valid) | (k_pos == q_pos)[None, None]  # a pad query sees itself: no all-masked row
        return mask, False

    # --------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        cache_position: Optional[torch.LongTensor] = None,
        logits_to_keep: int = 0,
        depth: Optional[int] = None,
        exit_policy: Optional[str] = None,
        exit_threshold: Optional[float] = None,
        exit_kv: Optional[str] = None,
        **kwargs,
    ):
        cfg = self.config
        if input_ids is None:
            raise ValueError("LoopTrainForCausalLM needs input_ids (inputs_embeds are not supported)")
        depth = cfg.inference_depth if depth is None else depth
        policy = cfg.exit_policy if exit_policy is None else exit_policy
        threshold = cfg.exit_threshold if exit_threshold is None else exit_threshold
        kv_mode = cfg.exit_kv if exit_kv is None else exit_kv
        cfg.check_inference_knobs(depth, policy, kv_mode)
        use_cache = cfg.use_cache if use_cache is None else use_cache
        return_dict = cfg.use_return_dict if return_dict is None else return_dict

        cache = past_key_values
        if cache is not None and not isinstance(cache, Cache):
            raise ValueError("past_key_values must be a transformers Cache (e.g. DynamicCache()) from this model")
        if cache is None and use_cache:
            cache = DynamicCache()
        batch, seq = input_ids.shape
        past = cache.get_seq_length() if cache is not None and len(cache.layers) else 0
        device = input_ids.device
        if position_ids is None:
            positions = torch.arange(past, past + seq, device=device)[None]
        else:
            positions = position_ids.to(device)
        if cfg.positions == "learned" and int(positions.max()) >= cfg.max_seq_len:
            raise ValueError(
                f"position {int(positions.max())} is beyond this model's {cfg.max_seq_len} learned positions; "
                "shorten the prompt or the number of new tokens"
            )
        mask, is_causal = self._mask(attention_mask, past, seq, device)
        early_exit = policy != "none"
        ctx = _Pass(cache, past, self._rope(positions), mask, is_causal, record=early_exit)

        x = self.tok_embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        for i, block in enumerate(self.prelude):
            x = block(x, ctx, ("prelude", i))
        e = x
        inject = None if cfg.injection == "none" else e
        raw = None
        carried = self._initial_state(e, positions)
        states = []
        logits = None
        exited = None
        exit_loops = None
        prev_logp = None
        survive = None
        loops_run = 0
        keep = slice(-logits_to_keep, None) if logits_to_keep and not early_exit else slice(None)
        for loop in range(1, depth + 1):
            frozen = None
            if early_exit and kv_mode == "copy" and exited is not None and bool(exited.any()):
                frozen = exited
            ctx.frozen, ctx.frozen_from = frozen, loop - 1
            new_raw = self.core(carried, inject, ctx, loop)
            raw = new_raw if frozen is None else torch.where(frozen[..., None], raw, new_raw)
            loops_run = loop
            if output_hidden_states:
                states.append(raw)
            last = loop == depth
            if early_exit or last:
                feats = self._exit_features(raw, loop, last, ctx)[:, keep]
                exit_logits = F.linear(feats, self.head_weight)
            if early_exit:
                if policy == "gate":
                    lam = torch.sigmoid(self.exit_gate(feats).squeeze(-1).float())
                    survive = (1.0 - lam) if survive is None else survive * (1.0 - lam)
                conf, prev_logp = exit_confidence(policy, exit_logits, prev_logp, loop, depth, survive)
                if exited is None:
                    exited = torch.zeros(batch, seq, dtype=torch.bool, device=device)
                    exit_loops = torch.full((batch, seq), depth, dtype=torch.long, device=device)
                    logits = exit_logits
                stop = ~exited if last else (~exited & (conf >= threshold))
                logits = torch.where(stop[..., None], exit_logits, logits)
                exit_loops = torch.where(stop, torch.full_like(exit_loops, loop), exit_loops)
                exited = exited | stop
                if kv_mode == "copy" and not last and bool(exited.all()):
                    break  # the deeper slots are filled from this loop's when a later token needs them
            elif last:
                logits = exit_logits
            carried = raw if self.carry_norm is None else self.carry_norm(raw)
        ctx.frozen = None
        if early_exit and logits_to_keep:
            logits = logits[:, -logits_to_keep:]

        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1).to(device), ignore_index=-100)
        output = LoopTrainCausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=cache if use_cache else None,
            hidden_states=tuple(states) if output_hidden_states else None,
            exit_loops=exit_loops,
            loops_run=loops_run,
        )
        return output if return_dict else output.to_tuple()


LoopTrainForCausalLM.register_for_auto_class("AutoModelForCausalLM")
LoopTrainConfig.register_for_auto_class()
