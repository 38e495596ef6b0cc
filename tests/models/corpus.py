"""The model corpus: tiny transformers models of many families, and the cases each one runs.

Every model is built from a config object with random weights (nothing is downloaded):
2 layers, hidden size 64, 4 heads, a 128-token vocabulary, ``attn_implementation="eager"``
(hand-written attention) or ``"sdpa"`` (SDPA calls, as transformers ships them by default), every dropout probability 0, and weights drawn ~10x wider than the default init so that the
attention is far from uniform (a wrong scale, mask or head mapping shows above 1e-4).

A *case* is one way of calling a model::

    case = build_case("mistral", "decode_pad_left")
    out = case.run(model_or_compiled)        # the tensor to compare, e.g. logits [B, S, V]
    out[case.valid]                          # the positions whose values mean something

Cases, by kind of family:

=========  ==============================================================================
decoder    ``nopad``, ``pad_left``, ``pad_right`` (prefill of SEQ tokens; row 1 padded),
           ``decode``, ``decode_pad_left`` (one new token after an eager prefill whose
           ``cache`` comes from ``use_cache=True``); families that list it also run
           ``packed`` (several sequences per row: ``position_ids`` restart, no cache, as in
           packed training batches — transformers then masks each sequence separately)
encoder    ``nopad``, ``pad_right``
seq2seq    ``nopad``, ``pad_right`` (encoder and decoder right-padded), ``decode`` (one
           decoder token against the cached self- and cross-attention keys)
vision     ``nopad`` (patches; no mask)
clip       ``text_nopad``, ``text_pad_right`` (causal text tower), ``vision_nopad``
=========  ==============================================================================

Inputs are rebuilt on every ``case.inputs()`` call: a KV cache is mutated by the forward pass
that reads it, so each run gets its own deep copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import transformers

VOCAB, HIDDEN, HEADS, LAYERS = 128, 64, 4, 2
HEAD_DIM = HIDDEN // HEADS
INIT = 0.2  # 10x the usual 0.02: scores of order 1, attention far from uniform
BATCH, SEQ, PAD = 2, 37, 7  # odd length; row 1 of the batch has PAD padding tokens
WINDOW = 8  # sliding windows (Mistral, Gemma2) much shorter than SEQ
CHUNK = 8  # Llama 4's attention chunks: SEQ spans several
PACKED = ((10, 15, 12), (20, 17))  # lengths of the sequences packed into each batch row (each sums to SEQ)
IMAGE, PATCH = 16, 4  # 16 patches (+ class token)
MEL_BINS, AUDIO_FRAMES = 16, 32  # Whisper: 2 * max_source_positions frames
_PATCH_TOKENS = (IMAGE // PATCH) ** 2 + 1

DECODER_CASES = ("nopad", "pad_left", "pad_right", "decode", "decode_pad_left")
ENCODER_CASES = ("nopad", "pad_right")
SEQ2SEQ_CASES = ("nopad", "pad_right", "decode")
VISION_CASES = ("nopad",)
CLIP_CASES = ("text_nopad", "text_pad_right", "vision_nopad")


@dataclass
class Case:
    """One call of one model: ``run(fn)`` calls ``fn(**inputs())`` and returns the compared tensor."""

    family: str
    name: str
    model: torch.nn.Module  # the module to compile (a submodule for the CLIP towers)
    inputs: Callable[[], dict]  # fresh keyword arguments on every call
    output: Callable[[Any], torch.Tensor]  # model output → the tensor to compare
    valid: torch.Tensor  # bool [B, S]: positions of the output that are not padding

    @property
    def id(self) -> str:
        return f"{self.family}-{self.name}"

    def run(self, fn: Callable) -> torch.Tensor:
        return self.output(fn(**self.inputs()))


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # decoder | encoder | seq2seq | vision | clip
    build: Callable[[str], torch.nn.Module] = field(repr=False)  # attn_implementation → model
    pad_token_id: int = 0
    note: str = ""  # what this family brings to the corpus
    extra_cases: tuple[str, ...] = ()  # cases beyond its kind's (``packed``)

    @property
    def cases(self) -> tuple[str, ...]:
        return {
            "decoder": DECODER_CASES, "encoder": ENCODER_CASES, "seq2seq": SEQ2SEQ_CASES,
            "vision": VISION_CASES, "clip": CLIP_CASES,
        }[self.kind] + self.extra_cases


# --- builders ---------------------------------------------------------------------------------

_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_LLAMA_LIKE = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
    num_attention_heads=HEADS, max_position_embeddings=128, attention_dropout=0.0,
    initializer_range=INIT, **_IDS,
)


def _llama(attn):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_LLAMA_LIKE, attn_implementation=attn, num_key_value_heads=2))


def _llama4(attn):  # chunked attention (chunks of CHUNK tokens) and full attention alternating, no MoE
    config = transformers.Llama4TextConfig(
        **_LLAMA_LIKE, attn_implementation=attn, num_key_value_heads=2, head_dim=HEAD_DIM, intermediate_size_mlp=2 * HIDDEN,
        num_local_experts=2, moe_layers=[], attention_chunk_size=CHUNK,
        layer_types=["chunked_attention", "full_attention"], no_rope_layers=[1, 0],
    )
    return transformers.Llama4ForCausalLM(config)


def _mistral(attn):
    return transformers.MistralForCausalLM(
        transformers.MistralConfig(**_LLAMA_LIKE, attn_implementation=attn, num_key_value_heads=2, sliding_window=WINDOW)
    )


def _qwen2(attn):
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_LLAMA_LIKE, attn_implementation=attn, num_key_value_heads=2))


def _qwen3(attn):
    return transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(**_LLAMA_LIKE, attn_implementation=attn, num_key_value_heads=2, head_dim=HEAD_DIM)
    )


def _gemma(attn):  # multi-query: one key/value head
    return transformers.GemmaForCausalLM(
        transformers.GemmaConfig(**_LLAMA_LIKE, attn_implementation=attn, num_key_value_heads=1, head_dim=HEAD_DIM)
    )


def _gemma2(attn):  # tanh softcap on the scores, alternating sliding-window / full layers
    return transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(
            **_LLAMA_LIKE, attn_implementation=attn, num_key_value_heads=2, head_dim=HEAD_DIM, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=HEAD_DIM,
            attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
        )
    )


def _phi3(attn):
    return transformers.Phi3ForCausalLM(
        transformers.Phi3Config(**_LLAMA_LIKE, attn_implementation=attn, num_key_value_heads=HEADS, resid_pdrop=0.0, embd_pdrop=0.0)
    )


def _gpt2(attn):
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=128,
            attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, initializer_range=INIT, **_IDS, attn_implementation=attn,
        )
    )


def _gpt_neox(attn):
    return transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=2 * HIDDEN, max_position_embeddings=128, attention_dropout=0.0,
            hidden_dropout=0.0, initializer_range=INIT, **_IDS, attn_implementation=attn,
        )
    )


def _gptj(attn):
    return transformers.GPTJForCausalLM(
        transformers.GPTJConfig(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, rotary_dim=HEAD_DIM // 2,
            n_positions=128, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, initializer_range=INIT,
            **_IDS, attn_implementation=attn,
        )
    )


def _opt(attn):
    return transformers.OPTForCausalLM(
        transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, ffn_dim=2 * HIDDEN,
            num_attention_heads=HEADS, max_position_embeddings=128, word_embed_proj_dim=HIDDEN,
            dropout=0.0, attention_dropout=0.0, init_std=INIT, **_IDS, attn_implementation=attn,
        )
    )


def _bloom(attn):  # ALiBi position bias, added through baddbmm
    return transformers.BloomForCausalLM(
        transformers.BloomConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, attention_dropout=0.0,
            hidden_dropout=0.0, initializer_range=INIT, **_IDS, attn_implementation=attn,
        )
    )


def _mpt(attn):  # ALiBi built from an arange longer than the input and sliced (a per-key slope · j)
    return transformers.MptForCausalLM(
        transformers.MptConfig(
            vocab_size=VOCAB, d_model=HIDDEN, n_layers=LAYERS, n_heads=HEADS, max_seq_len=128, resid_pdrop=0,
            emb_pdrop=0, initializer_range=INIT, **_IDS, attn_implementation=attn,
        )
    )


def _falcon(attn):  # multi-query, rotary, parallel attention (the 7B layout)
    return transformers.FalconForCausalLM(
        transformers.FalconConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            multi_query=True, new_decoder_architecture=False, alibi=False, attention_dropout=0.0,
            hidden_dropout=0.0, initializer_range=INIT, max_position_embeddings=128, **_IDS, attn_implementation=attn,
        )
    )


_BERT_LIKE = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
    intermediate_size=2 * HIDDEN, max_position_embeddings=128, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0, initializer_range=INIT,
)


def _bert(attn):
    return transformers.BertModel(transformers.BertConfig(**_BERT_LIKE, attn_implementation=attn, pad_token_id=0), add_pooling_layer=False)


def _roberta(attn):  # positions counted from padding_idx + 1, padding read off input_ids
    return transformers.RobertaModel(
        transformers.RobertaConfig(**_BERT_LIKE, attn_implementation=attn, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        add_pooling_layer=False,
    )


def _t5(attn):  # relative position bias (shared by the layers), no 1/sqrt(d) scaling
    return transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=VOCAB, d_model=HIDDEN, d_kv=HEAD_DIM, d_ff=2 * HIDDEN, num_layers=LAYERS,
            num_decoder_layers=LAYERS, num_heads=HEADS, relative_attention_num_buckets=8,
            relative_attention_max_distance=16, dropout_rate=0.0, initializer_factor=1.0,
            pad_token_id=0, eos_token_id=2, decoder_start_token_id=0, attn_implementation=attn,
        )
    )


def _bart(attn):  # encoder self-attention, causal decoder, cross-attention
    return transformers.BartForConditionalGeneration(
        transformers.BartConfig(
            vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
            encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=2 * HIDDEN,
            decoder_ffn_dim=2 * HIDDEN, max_position_embeddings=128, dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, init_std=INIT, pad_token_id=1, bos_token_id=0, eos_token_id=2,
            decoder_start_token_id=2, forced_eos_token_id=2, attn_implementation=attn,
        )
    )


def _whisper(attn):  # audio encoder (no mask), causal decoder, cross-attention
    return transformers.WhisperForConditionalGeneration(
        transformers.WhisperConfig(
            vocab_size=VOCAB, num_mel_bins=MEL_BINS, d_model=HIDDEN, encoder_layers=LAYERS,
            decoder_layers=LAYERS, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
            encoder_ffn_dim=2 * HIDDEN, decoder_ffn_dim=2 * HIDDEN, max_source_positions=AUDIO_FRAMES // 2,
            max_target_positions=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
            init_std=INIT, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
            suppress_tokens=None, begin_suppress_tokens=None, attn_implementation=attn,
        )
    )


def _vit(attn):
    return transformers.ViTModel(
        transformers.ViTConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
            image_size=IMAGE, patch_size=PATCH, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            initializer_range=INIT, attn_implementation=attn,
        ),
        add_pooling_layer=False,
    )


def _clip(attn):  # causal (+ padding) text tower and an unmasked vision tower
    tower = dict(
        hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        attention_dropout=0.0, initializer_factor=3.0,
    )
    config = transformers.CLIPConfig(
        text_config=dict(
            tower, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2
        ),
        vision_config=dict(tower, image_size=IMAGE, patch_size=PATCH),
        projection_dim=32, initializer_factor=3.0, attn_implementation=attn,
    )
    return transformers.CLIPModel(config)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", "decoder", _llama, note="GQA (2 query heads per kv head)", extra_cases=("packed",)),
        Family("llama4", "decoder", _llama4, note=f"chunked attention ({CHUNK}-token chunks) / full alternating",
               extra_cases=("packed",)),
        Family("mistral", "decoder", _mistral, note=f"GQA, sliding window {WINDOW} < {SEQ} tokens"),
        Family("qwen2", "decoder", _qwen2, note="GQA, q/k/v biases"),
        Family("qwen3", "decoder", _qwen3, note="GQA, q/k RMS norm"),
        Family("gemma", "decoder", _gemma, note="multi-query (1 kv head)"),
        Family("gemma2", "decoder", _gemma2, note=f"tanh softcap, sliding window {WINDOW} / full alternating"),
        Family("phi3", "decoder", _phi3, note="fused qkv projection"),
        Family("gpt2", "decoder", _gpt2, note="Conv1D, learned positions"),
        Family("gpt_neox", "decoder", _gpt_neox, note="partial rotary"),
        Family("gptj", "decoder", _gptj, note="interleaved partial rotary"),
        Family("opt", "decoder", _opt, note="learned positions from the attention mask"),
        Family("bloom", "decoder", _bloom, note="ALiBi through baddbmm"),
        Family("falcon", "decoder", _falcon, note="multi-query, 7B layout"),
        Family("mpt", "decoder", _mpt, note="ALiBi from a sliced arange (structural slopes)"),
        Family("bert", "encoder", _bert, note="bidirectional, key padding"),
        Family("roberta", "encoder", _roberta, pad_token_id=1, note="bidirectional, key padding"),
        Family("t5", "seq2seq", _t5, note="relative position bias, no scaling, cross-attention"),
        Family("bart", "seq2seq", _bart, pad_token_id=1, note="cross-attention, encoder padding"),
        Family("whisper", "seq2seq", _whisper, note="audio encoder, cross-attention"),
        Family("vit", "vision", _vit, note="bidirectional, no mask"),
        Family("clip", "clip", _clip, pad_token_id=1, note="causal text tower + vision tower"),
    )
}


# --- inputs ------------------------------------------------------------------------------------


def _ids(length: int = SEQ) -> torch.Tensor:
    return torch.randint(3, VOCAB, (BATCH, length))


def _padded(ids: torch.Tensor, side: str, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad row 1 of ``ids`` by PAD tokens on ``side``; returns (ids, attention_mask [B, S] long)."""
    ids = ids.clone()
    mask = torch.ones_like(ids)
    cols = slice(None, PAD) if side == "left" else slice(ids.shape[1] - PAD, None)
    mask[1, cols] = 0
    ids[1, cols] = pad_token_id
    return ids, mask


def _all_valid(batch: int, length: int) -> torch.Tensor:
    return torch.ones(batch, length, dtype=torch.bool)


def _fixed(kwargs: dict) -> Callable[[], dict]:
    """Inputs without state: the same dict on every call (tensors are not mutated)."""
    return lambda: dict(kwargs)


def _with_cache(kwargs: dict, cache: Any) -> Callable[[], dict]:
    """Inputs holding a KV cache: a fresh deep copy of it on every call."""
    return lambda: dict(kwargs, cache=copy.deepcopy(cache))


def _decoder_case(fam: Family, model, case: str) -> Case:
    logits = lambda out: out.logits  # noqa: E731
    if case == "nopad":
        ids = _ids()
        return Case(fam.name, case, model, _fixed({"input_ids": ids}), logits, _all_valid(BATCH, SEQ))
    if case in ("pad_left", "pad_right"):
        ids, mask = _padded(_ids(), case.split("_")[1], fam.pad_token_id)
        return Case(fam.name, case, model, _fixed({"input_ids": ids, "attention_mask": mask}), logits, mask.bool())
    if case == "packed":
        positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in PACKED])
        inputs = {"input_ids": _ids(), "position_ids": positions, "use_cache": False}
        return Case(fam.name, case, model, _fixed(inputs), logits, _all_valid(BATCH, SEQ))
    if case in ("decode", "decode_pad_left"):
        prompt = {"input_ids": _ids()}
        if case == "decode_pad_left":
            prompt["input_ids"], prompt["attention_mask"] = _padded(prompt["input_ids"], "left", fam.pad_token_id)
        with torch.no_grad():
            cache = model(**prompt, use_cache=True).cache
        step = {"input_ids": _ids(1), "use_cache": True}
        if "attention_mask" in prompt:
            step["attention_mask"] = torch.cat([prompt["attention_mask"], torch.ones(BATCH, 1, dtype=torch.long)], 1)
        return Case(fam.name, case, model, _with_cache(step, cache), logits, _all_valid(BATCH, 1))
    raise ValueError(f"unknown decoder case {case!r}; expected one of {DECODER_CASES}")


def _encoder_case(fam: Family, model, case: str) -> Case:
    hidden = lambda out: out.last_hidden_state  # noqa: E731
    ids = _ids()
    if case == "nopad":
        return Case(fam.name, case, model, _fixed({"input_ids": ids}), hidden, _all_valid(BATCH, SEQ))
    if case == "pad_right":
        ids, mask = _padded(ids, "right", fam.pad_token_id)
        return Case(fam.name, case, model, _fixed({"input_ids": ids, "attention_mask": mask}), hidden, mask.bool())
    raise ValueError(f"unknown encoder case {case!r}; expected one of {ENCODER_CASES}")


def _seq2seq_case(fam: Family, model, case: str) -> Case:
    logits = lambda out: out.logits  # noqa: E731
    dec_len = SEQ // 2 + 1  # 19: a different length from the encoder's, so Sq != Sk in cross-attention
    if fam.name == "whisper":
        enc = {"input_features": torch.randn(BATCH, MEL_BINS, AUDIO_FRAMES)}
        enc_pad = {}  # Whisper's encoder takes no attention mask: padding is silence in the features
    else:
        enc_ids, enc_mask = _padded(_ids(), "right", fam.pad_token_id)
        enc = {"input_ids": _ids()}
        enc_pad = {"input_ids": enc_ids, "attention_mask": enc_mask}
    dec = _ids(dec_len)
    if case == "nopad":
        kwargs = {**enc, "decoder_input_ids": dec}
        return Case(fam.name, case, model, _fixed(kwargs), logits, _all_valid(BATCH, dec_len))
    if case == "pad_right":
        dec, dec_mask = _padded(dec, "right", fam.pad_token_id)
        kwargs = {**(enc_pad or enc), "decoder_input_ids": dec, "decoder_attention_mask": dec_mask}
        return Case(fam.name, case, model, _fixed(kwargs), logits, dec_mask.bool())
    if case == "decode":
        prompt = {**(enc_pad or enc), "decoder_input_ids": dec}
        with torch.no_grad():
            first = model(**prompt, use_cache=True)
        step = {"encoder_outputs": (first.encoder_last_hidden_state,), "decoder_input_ids": _ids(1)}
        step["use_cache"] = True
        if "attention_mask" in prompt:
            step["attention_mask"] = prompt["attention_mask"]
        return Case(fam.name, case, model, _with_cache(step, first.cache), logits, _all_valid(BATCH, 1))
    raise ValueError(f"unknown seq2seq case {case!r}; expected one of {SEQ2SEQ_CASES}")


def _vision_case(fam: Family, model, case: str) -> Case:
    if case != "nopad":
        raise ValueError(f"unknown vision case {case!r}; expected one of {VISION_CASES}")
    pixels = torch.randn(BATCH, 3, IMAGE, IMAGE)
    hidden = lambda out: out.last_hidden_state  # noqa: E731
    return Case(fam.name, case, model, _fixed({"pixel_values": pixels}), hidden, _all_valid(BATCH, _PATCH_TOKENS))


def _clip_case(fam: Family, model, case: str) -> Case:
    hidden = lambda out: out.last_hidden_state  # noqa: E731
    if case == "vision_nopad":
        pixels = torch.randn(BATCH, 3, IMAGE, IMAGE)
        tower = model.vision_model
        return Case(fam.name, case, tower, _fixed({"pixel_values": pixels}), hidden, _all_valid(BATCH, _PATCH_TOKENS))
    ids = _ids()
    if case == "text_nopad":
        return Case(fam.name, case, model.text_model, _fixed({"input_ids": ids}), hidden, _all_valid(BATCH, SEQ))
    if case == "text_pad_right":
        ids, mask = _padded(ids, "right", fam.pad_token_id)
        kwargs = {"input_ids": ids, "attention_mask": mask}
        return Case(fam.name, case, model.text_model, _fixed(kwargs), hidden, mask.bool())
    raise ValueError(f"unknown CLIP case {case!r}; expected one of {CLIP_CASES}")


ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
# transformers ships these three with hand-written attention only (no SDPA path).
SDPA_FAMILIES = frozenset(FAMILIES) - {"gemma2", "bloom", "mpt"}


_CASE_MAKERS = {
    "decoder": _decoder_case, "encoder": _encoder_case, "seq2seq": _seq2seq_case,
    "vision": _vision_case, "clip": _clip_case,
}


def build_model(family: str, seed: int = 0, attn: str = "eager") -> torch.nn.Module:
    """The family's tiny model in eval mode, with weights drawn from ``seed`` and transformers'
    ``attn_implementation`` ``attn``: ``"eager"`` (hand-written attention) or ``"sdpa"`` (the
    default as transformers ships it; families in ``SDPA_FAMILIES``)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; the corpus has {sorted(FAMILIES)}")
    if attn not in ATTENTION_IMPLEMENTATIONS or (attn == "sdpa" and family not in SDPA_FAMILIES):
        raise ValueError(f"{family} has no attn_implementation={attn!r} in transformers; "
                         f"SDPA families: {sorted(SDPA_FAMILIES)}")
    torch.manual_seed(seed)
    model = FAMILIES[family].build(attn).eval()
    assert model.config._attn_implementation == attn, (family, model.config._attn_implementation)
    return model


def build_case(family: str, case: str, seed: int = 0, model: torch.nn.Module = None, attn: str = "eager") -> Case:
    """One case of one family; pass ``model`` to reuse a model built by ``build_model``."""
    fam = FAMILIES[family]
    if case not in fam.cases:
        raise ValueError(f"{family} has no case {case!r}; its cases are {fam.cases}")
    model = model if model is not None else build_model(family, seed, attn)
    torch.manual_seed(seed + 1)
    return _CASE_MAKERS[fam.kind](fam, model, case)


def expected_sites(family: str, case: str) -> int:
    """Attention sites one run of the case goes through: self-attention per layer, plus, for
    seq2seq, the decoder's self- and cross-attention (only the decoder runs in ``decode``)."""
    if FAMILIES[family].kind != "seq2seq":
        return LAYERS
    return 2 * LAYERS if case == "decode" else 3 * LAYERS


def _families(attn: str) -> dict[str, Family]:
    return {name: fam for name, fam in FAMILIES.items() if attn == "eager" or name in SDPA_FAMILIES}


def all_case_ids(attn: str = "eager") -> list[tuple[str, str]]:
    """Every (family, case) pair of the corpus with ``attn``, family by family."""
    return [(name, case) for name, fam in _families(attn).items() for case in fam.cases]


def first_case_ids(attn: str = "eager") -> list[tuple[str, str]]:
    """One case per family: the most demanding one that still compiles quickly (a padded prefill)."""
    pick = {
        "decoder": "pad_left", "encoder": "pad_right", "seq2seq": "pad_right", "vision": "nopad",
        "clip": "text_pad_right",
    }
    return [(name, pick[fam.kind]) for name, fam in _families(attn).items()]
