"""Typed configuration: model presets, YAML files and `key=value` overrides.

One config system serves every entry point: a `Config` holds the model, mesh, data, optimizer, training and
checkpoint sections; `load_config` reads YAML and applies dotted overrides (`optim.lr=1e-3`). Unknown keys and bad
values raise `ConfigError` with a one-line message that names the key and suggests the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REMAT_POLICIES = ("none", "full", "save_dots", "save_qkv", "save_attention", "offload_attention")
ATTENTION = ("auto", "xla", "cudnn", "splash")
DTYPES = ("float32", "bfloat16", "float16")
NONFINITE_POLICIES = ("halt", "skip")
QUANT = ("none", "int8", "int4")
LOSS_SCALES = ("auto", "dynamic", "none")
MARGIN_TABLES = ("none", "small", "large")  # llama_jax.alignment.rewards_math.MARGINS
DPO_VARIANTS = ("dpo", "ipo")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message says which and how to fix it."""


def _positive_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading `2:4` as the string it is in YAML 1.2 (an N:M `prune.method`), not as YAML
    1.1's base-60 integer 124; every other integer form reads as before."""


_INT = "tag:yaml.org,2002:int"
_Loader.yaml_implicit_resolvers = {first: [(tag, regexp) for tag, regexp in resolvers if tag != _INT]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_INT, re.compile(
    r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"), list("-+0123456789"))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def nearest(name: str, choices: typing.Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


@dataclass(frozen=True)
class LlamaConfig:
    """LLaMA 2 architecture: everything that fixes the parameter shapes and the function (names follow Meta's
    params.json). Checkpoints of every format store exactly this; how the model runs is `ExecutionConfig`."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    head_dim: int | None = None

    def __post_init__(self) -> None:
        """Fill the derived defaults: `n_kv_heads = n_heads` and `head_dim = dim / n_heads` (Meta's rule; an
        explicit `head_dim`, as HF's config allows, is what head pruning leaves: fewer heads of the same size)."""
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None and self.n_heads > 0:
            if self.dim % self.n_heads:
                raise ConfigError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads}), "
                                  "or set model.head_dim")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        self.validate()

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "LlamaConfig":
        """Build a named preset (`llama2-7b`, `tiny`, ...), optionally with field overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset '{name}'{nearest(name, PRESETS)}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def derived_head_dim(self) -> bool:
        """True when `head_dim` is `dim / n_heads`, the only case Meta's and llama2.c's formats can describe."""
        return self.head_dim * self.n_heads == self.dim

    @property
    def attention_width(self) -> int:
        """Width of all query heads together (`n_heads * head_dim`; `dim` unless heads were pruned)."""
        return self.n_heads * self.head_dim

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def meta_ffn_base(self) -> int:
        """Meta's FeedForward starting width, `int(2 * 4 * dim / 3)`, before the multiplier and rounding."""
        return int(2 * 4 * self.dim / 3)

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width exactly as Meta's FeedForward derives it, unless set explicitly (HF `intermediate_size`)."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = self.meta_ffn_base
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def shape_differences(self, other: "LlamaConfig") -> list[str]:
        """`field: mine vs other's` for every field that changes a parameter shape (empty if none does)."""
        return [f"{k}: {getattr(self, k)} vs {getattr(other, k)}" for k in SHAPE_FIELDS
                if getattr(self, k) != getattr(other, k)]

    def num_params(self) -> int:
        """Parameter count derived from the shapes (no arrays needed)."""
        kv = self.n_kv_heads * self.head_dim
        per_layer = (2 * self.dim * self.attention_width + 2 * self.dim * kv + 3 * self.dim * self.hidden_dim
                     + 2 * self.dim)
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * per_layer + self.dim + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul parameters (output head included) plus causal attention."""
        kv = self.n_kv_heads * self.head_dim
        layer = 2 * self.dim * self.attention_width + 2 * self.dim * kv + 3 * self.dim * self.hidden_dim
        matmul_params = self.n_layers * layer + self.vocab_size * self.dim
        return 6.0 * matmul_params + 6.0 * self.n_layers * self.dim * seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len",
                     "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim = {self.head_dim} must be even for RoPE; change dim, n_heads or head_dim")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads})")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("model.norm_eps and model.rope_theta must be positive")


SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "hidden_dim", "tie_embeddings")


@dataclass(frozen=True)
class ExecutionConfig:
    """How a model runs: dtypes, rematerialisation, layer scan, attention implementation (`llama_jax.attention`:
    auto | xla | cudnn | splash), weight-only quantization (`llama_jax.quant`: none | int8 per channel | int4 in
    groups of `quant_group_size` input features), and the residual `dropout` rate that train steps apply. Never stored as part of a checkpoint's architecture
    and free to change at load time (a run trained with one setting resumes or loads under another)."""

    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False
    attention: str = "auto"
    quant: str = "none"
    quant_group_size: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name, choices in (("remat", REMAT_POLICIES), ("dtype", DTYPES), ("param_dtype", DTYPES),
                              ("attention", ATTENTION), ("quant", QUANT)):
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(f"execution.{name} '{value}' is not one of {choices}{nearest(str(value), choices)}")
        if self.quant_group_size < 1:
            raise ConfigError(f"execution.quant_group_size must be positive, got {self.quant_group_size}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"execution.dropout must be in [0, 1), got {self.dropout}")


_LLAMA2 = dict(multiple_of=256, norm_eps=1e-5, vocab_size=32000, max_seq_len=4096)
PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(_LLAMA2, dim=4096, n_layers=32, n_heads=32),
    "llama2-13b": dict(_LLAMA2, dim=5120, n_layers=40, n_heads=40),
    "llama2-70b": dict(_LLAMA2, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                       ffn_dim_multiplier=1.3),
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=1024, multiple_of=32, max_seq_len=256),
    "stories15m": dict(dim=288, n_layers=6, n_heads=6, vocab_size=32000, multiple_of=32, max_seq_len=256,
                       tie_embeddings=True),
    "stories110m": dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000, multiple_of=32, max_seq_len=1024,
                        tie_embeddings=True),
}


@dataclass
class MeshConfig:
    """Device-mesh axis sizes; exactly one may be -1 to take the remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclass
class DataSource:
    """One text source, by the form of its `name`: a TFDS dataset (`c4/en`); local `.txt`/`.jsonl`/`.parquet` files
    (comma-separated paths or globs); or a Hugging Face dataset `hf:ORG/NAME[:config]` / `hf:/path` (a directory
    written by `Dataset.save_to_disk`, or of data files), read in streaming mode (`data.streaming`)."""

    name: str = "tiny_shakespeare"
    split: str = "train"
    text_feature: str = "text"
    weight: float = 1.0


@dataclass
class DataConfig:
    """Pretraining data: a weighted mixture of `sources`, packed into windows of `seq_len + 1` tokens.

    Validation comes from `validation` (another source), or else from holding out the last `validation_fraction`
    of the first source's text. `data_dir` is the TFDS directory (a `gs://` path works); `cache_dir` holds prepared
    local files and tokenized corpora (default `~/.cache/llama_jax`). Without `tokenizer`, one with
    `tokenizer_vocab_size` pieces is trained on the first source and kept in the run directory. A TFDS dataset
    missing from `data_dir` is built only if `allow_download` permits: unset = on single-process runs only, true =
    by process 0 while the others wait, false = never (a one-line error says where to copy it from).

    With `streaming`, training sources are read lazily (tokenized on the fly, nothing prepared up front) as
    `streams` independent shard streams, each packing its own documents and shuffling them through a buffer of
    `shuffle_buffer` windows. The batch order depends on `streams`, never on the process count, which must divide
    `streams` (times `workers`, grain worker processes per host; 0 reads in background threads).

    `shift_windows` (in-memory training data only) cuts each epoch's windows at a new offset of 0 .. seq_len - 1
    tokens, so a token is predicted from different contexts in each epoch (nanoGPT samples random windows every
    batch for the same reason): it matters when a small corpus is read many times over.
    """

    sources: list[DataSource] = field(default_factory=lambda: [DataSource()])
    validation: DataSource | None = None
    data_dir: str | None = None
    cache_dir: str | None = None
    seq_len: int = 256
    shuffle_seed: int = 0
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 1024
    validation_fraction: float = 0.0
    allow_download: bool | None = None
    streaming: bool = False
    streams: int = 8
    shuffle_buffer: int = 256
    workers: int = 0
    shift_windows: bool = False


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay (Llama 2 paper defaults).

    `loss_scale` (see `training.loss_scale`): `dynamic` (start at 2^16, double after `loss_scale_period` clean steps,
    halve and skip the update on an Inf/NaN gradient), a number (a fixed scale), `none`, or `auto` = dynamic when
    `execution.dtype` is float16, else none.
    """

    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 2000
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accum_steps: int = 1
    loss_scale: str = "auto"
    loss_scale_period: int = 2000

    def __post_init__(self) -> None:
        if self.loss_scale not in LOSS_SCALES and not _positive_number(self.loss_scale):
            raise ConfigError(f"optim.loss_scale '{self.loss_scale}' is not one of {LOSS_SCALES} or a positive number"
                              f"{nearest(self.loss_scale, LOSS_SCALES)}")
        if self.loss_scale_period < 1:
            raise ConfigError(f"optim.loss_scale_period must be at least 1, got {self.loss_scale_period}")
        for name in ("lr", "eps", "grad_clip"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"optim.{name} must be positive, got {getattr(self, name)}")
        for name in ("min_lr_ratio", "b1", "b2"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"optim.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ConfigError(f"optim.warmup_steps ({self.warmup_steps}) and optim.weight_decay "
                              f"({self.weight_decay}) must not be negative")


@dataclass
class TrainConfig:
    """Run length, batch, logging, sampling and cluster settings. With several processes, SIGTERM and
    `max_minutes` are agreed across them every `stop_check_every` steps (one small all-gather), and a process that
    stops sending heartbeats for `heartbeat_timeout_s` ends every process instead of a hang. A step whose loss or
    gradient is NaN/Inf never changes the parameters or optimizer state; `nonfinite` says what happens next: `halt`
    (stop with an error naming the step and metric, saving nothing newer) or `skip` (drop that batch, go on, and
    halt after `max_nonfinite_skips` such steps in a row)."""

    steps: int = 1000
    batch_size: int = 16
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    max_minutes: float | None = None
    peak_flops_per_device: float | None = None
    sample_prompt: str = ""
    sample_tokens: int = 200
    sample_temperature: float = 0.8
    init_from: str | None = None
    distributed: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    stop_check_every: int = 10
    heartbeat_timeout_s: int = 100
    nonfinite: str = "halt"
    max_nonfinite_skips: int = 10

    def __post_init__(self) -> None:
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"train.nonfinite '{self.nonfinite}' is not one of {NONFINITE_POLICIES}"
                              f"{nearest(self.nonfinite, NONFINITE_POLICIES)}")
        if self.heartbeat_timeout_s < 1:
            raise ConfigError(f"train.heartbeat_timeout_s must be at least 1, got {self.heartbeat_timeout_s}")
        if self.max_nonfinite_skips < 1:
            raise ConfigError(f"train.max_nonfinite_skips must be at least 1, got {self.max_nonfinite_skips}")


@dataclass
class CheckpointConfig:
    dir: str = "runs/default"
    every: int = 500
    max_to_keep: int = 3
    async_save: bool = True


@dataclass
class LoraConfig:
    """LoRA adapters: `rank` 0 trains every weight; > 0 freezes the base and trains `alpha / rank`-scaled adapters on
    `targets` (q, k, v, o, gate, up, down, PEFT names such as q_proj, or regular expressions over them)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])

    def __post_init__(self) -> None:
        if self.rank < 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError(f"lora needs rank >= 0 (0 = full fine-tuning), alpha > 0 and 0 <= dropout < 1; got "
                              f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}")


@dataclass
class FinetuneConfig:
    """Supervised fine-tuning data and schedule (Llama 2: 2 epochs, packed, loss on the answers only).

    `train` / `validation` are JSONL files (comma-separated paths or globs; gs:// works), a TFDS dataset
    `tfds:NAME[:VERSION]` (in `data.data_dir`) or a Hugging Face dataset `hf:ORG/NAME[:config]` / `hf:/path` (a
    `save_to_disk` directory or a directory of data files), read from `train_split` / `validation_split`. Records
    hold `messages` (Llama-2-chat dialogs), `prompt` + `completion`, or `text`; `fields` renames other column names
    to these (`{prompt: question, completion: answer}`). `bad_records` decides what an unusable record does:
    `truncate` cuts over-long examples and skips malformed ones, `skip` skips both, `fail` stops at the first; every
    skipped record is reported with its file and line (record index for datasets). `epochs` > 0 sets `train.steps`
    from the data.
    """

    init_from: str | None = None
    train: str = ""
    validation: str | None = None
    train_split: str = "train"
    validation_split: str = "validation"
    fields: dict[str, str] = field(default_factory=dict)
    epochs: float = 2.0
    packing: bool = True
    last_turn_only: bool = False
    bad_records: str = "truncate"

    def __post_init__(self) -> None:
        shapes = ("messages", "prompt", "completion", "text")
        if not isinstance(self.fields, dict) or not all(isinstance(v, str) for v in self.fields.values()):
            raise ConfigError("finetune.fields must map record fields to column names, e.g. "
                              f"{{prompt: question, completion: answer}}, got {self.fields!r}")
        unknown = sorted(set(self.fields) - set(shapes))
        if unknown:
            raise ConfigError(f"finetune.fields keys {unknown} are not record fields; use some of {list(shapes)}")


PRUNE_METHODS = ("none", "magnitude", "structured")  # plus N:M patterns such as "2:4"
PRUNE_SCOPES = ("layer", "global")


@dataclass
class PruneConfig:
    """Weight pruning (`llama_jax.compression`) of the block projections (wq, wk, wv, wo, w1, w2, w3).

    `magnitude` zeroes the `sparsity` fraction of smallest-magnitude weights, in each matrix of each layer
    (`scope: layer`) or below one threshold over all of them (`scope: global`); `N:M` (e.g. `2:4`) keeps the N
    largest of every M consecutive input weights; `structured` removes the weakest FFN channels down to
    `ffn_hidden_dim` and whole KV groups (a kv head with its query heads) down to `n_kv_heads`, the same count in
    every layer, so the checkpoint shrinks. A train or finetune run with a magnitude or N:M section computes the
    mask once from its initial weights (a checkpoint pruned the same way yields its own zero pattern), keeps it in
    the optimizer state, and the masked weights stay exactly zero.
    """

    method: str = "none"
    sparsity: float = 0.5
    scope: str = "layer"
    ffn_hidden_dim: int | None = None
    n_kv_heads: int | None = None

    def __post_init__(self) -> None:
        if self.method not in PRUNE_METHODS and self.n_of_m is None:
            raise ConfigError(f"prune.method '{self.method}' is not one of {PRUNE_METHODS} or an N:M pattern such "
                              f"as 2:4{nearest(self.method, PRUNE_METHODS)}")
        if not 0 <= self.sparsity < 1:
            raise ConfigError(f"prune.sparsity must be in [0, 1), got {self.sparsity}")
        if self.scope not in PRUNE_SCOPES:
            raise ConfigError(f"prune.scope '{self.scope}' is not one of {PRUNE_SCOPES}")
        for name in ("ffn_hidden_dim", "n_kv_heads"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"prune.{name} must be positive, got {getattr(self, name)}")

    @property
    def n_of_m(self) -> tuple[int, int] | None:
        """(N, M) of an `N:M` method with 0 < N < M, else None."""
        n, sep, m = self.method.partition(":")
        if not (sep and n.isdigit() and m.isdigit()) or not 0 < int(n) < int(m):
            return None
        return int(n), int(m)

    @property
    def masks_weights(self) -> bool:
        """True for the methods that zero weights in place (magnitude, N:M) and so keep a mask in training."""
        return self.method == "magnitude" or self.n_of_m is not None


@dataclass
class RewardConfig:
    """Reward-model training and scoring (`align reward|score`). Pairs come from `finetune.train` (held-out:
    `finetune.validation`), the backbone from `finetune.init_from`. `margin` is the table m(rating) of the ranking
    loss: none, small (1, 2/3, 1/3, 0) or large (3, 2, 1, 0). `score` reads `score_input` JSONL (prompt/messages +
    completion) and writes it with rewards to `score_output`, using the reward run `checkpoint` (default
    `checkpoint.dir`)."""

    margin: str = "small"
    checkpoint: str | None = None
    score_input: str = ""
    score_output: str = ""

    def __post_init__(self) -> None:
        if self.margin not in MARGIN_TABLES:
            raise ConfigError(f"reward.margin '{self.margin}' is not one of {MARGIN_TABLES}"
                              f"{nearest(self.margin, MARGIN_TABLES)}")


@dataclass
class DpoConfig:
    """Direct preference optimisation (`align dpo`) on the pairs of `finetune.train`, from `finetune.init_from`,
    which is also the reference (under LoRA: the base with adapters off). `variant` dpo minimises
    `-log σ(β h)` (with `label_smoothing` ε > 0: conservative DPO, `-(1-ε) log σ(β h) - ε log σ(-β h)`); ipo
    minimises `(h - 1/(2β))²`; h = the policy's minus the reference's log-ratio of chosen over rejected. The
    reference log-probabilities are computed once and cached at `reference_cache` (default
    `<checkpoint.dir>/reference_logps.npz`)."""

    beta: float = 0.1
    variant: str = "dpo"
    label_smoothing: float = 0.0
    reference_cache: str | None = None

    def __post_init__(self) -> None:
        if self.variant not in DPO_VARIANTS:
            raise ConfigError(f"dpo.variant '{self.variant}' is not one of {DPO_VARIANTS}"
                              f"{nearest(self.variant, DPO_VARIANTS)}")
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.variant != "dpo":
            raise ConfigError("dpo.label_smoothing applies to variant dpo only; set it to 0 for ipo")


@dataclass
class PpoConfig:
    """PPO as Llama 2 ran it (paper section 3.2.3): per iteration, `batch_size` rollouts from prompts of `prompts`
    (JSONL `messages` ending with a user turn, or `prompt` text), scored by `reward` (a reward-model directory or a
    `module:function` reward callable), reward `whiten(logit(R)) - kl_coef * KL` per token (each switchable), GAE
    (`gamma`, `lam`), clipped objective (`clip`, values by `value_clip`), `epochs` passes of one AdamW step (constant
    `lr`, the `optim` section's betas, decay and clipping) per `minibatch_size` rows. With `kl_target` (nats per
    reply) the KL coefficient starts at `kl_coef` and adapts each iteration towards that KL over `kl_horizon`
    rollouts (Ziegler et al. 2019); `max_kl` (nats per reply) ends an iteration's updates once the policy's KL to the
    reference on a minibatch exceeds it (Spinning Up's early stopping). `critic` is `separate` (a second
    copy of the policy's trunk with a value head) or `shared` (the value head on the policy's trunk). With LoRA the
    reference is the base with adapters off. `gather_weights` samples from an fsdp-gathered copy of the weights, made
    once per rollout on device (the paper's generation ran ~20x slower under FSDP until it gathered them)."""

    init_from: str | None = None
    reward: str = ""
    prompts: str = ""
    iterations: int = 200
    batch_size: int = 64
    minibatch_size: int = 8
    epochs: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    kl_coef: float = 0.01
    kl_target: float | None = None
    kl_horizon: int = 10000
    max_kl: float | None = None
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    value_coef: float = 0.1
    lr: float = 1e-6
    logit_reward: bool = True
    whiten_reward: bool = True
    critic: str = "separate"
    gather_weights: bool = True

    def __post_init__(self) -> None:
        if self.critic not in ("separate", "shared"):
            raise ConfigError(f"ppo.critic '{self.critic}' is not one of ('separate', 'shared')"
                              f"{nearest(self.critic, ('separate', 'shared'))}")
        for name in ("iterations", "batch_size", "minibatch_size", "epochs", "max_new_tokens", "kl_horizon"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ppo.{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size % self.minibatch_size:
            raise ConfigError(f"ppo.batch_size ({self.batch_size}) must be a multiple of ppo.minibatch_size "
                              f"({self.minibatch_size})")
        if self.lr <= 0 or self.temperature <= 0 or self.kl_coef < 0:
            raise ConfigError(f"ppo.lr ({self.lr}) and ppo.temperature ({self.temperature}) must be positive and "
                              f"ppo.kl_coef ({self.kl_coef}) not negative")
        for name in ("kl_target", "max_kl"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"ppo.{name} must be positive (nats per reply) or null, got {getattr(self, name)}")


@dataclass
class RejectionConfig:
    """Rejection sampling (paper section 3.2.3): `samples` completions per prompt of `prompts`, sample k drawn at
    `temperatures[k % len(temperatures)]`, scored by `reward` (as `ppo.reward`); the best per prompt, pooled with
    the best of earlier rounds listed in `pool` (their `output` files), is written to `output` as SFT JSONL and, with
    `finetune` true, fine-tuned on (the `finetune` section's settings, `finetune.init_from` = `init_from`)."""

    init_from: str | None = None
    reward: str = ""
    prompts: str = ""
    samples: int = 4
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    max_new_tokens: int = 128
    batch_size: int = 64
    output: str = ""
    pool: list[str] = field(default_factory=list)
    finetune: bool = True

    def __post_init__(self) -> None:
        if self.samples < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError(f"rejection.samples ({self.samples}), rejection.batch_size ({self.batch_size}) and "
                              f"rejection.max_new_tokens ({self.max_new_tokens}) must be at least 1")
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ConfigError(f"rejection.temperatures must be a non-empty list of temperatures >= 0, got "
                              f"{self.temperatures}")


@dataclass
class GattConfig:
    """Ghost Attention data (paper section 3.3): for each dialog of `dialogs` (JSONL `messages`), an instruction
    made of 1..`max_combined` entries drawn from different categories of `instructions` (YAML/JSON: category ->
    list of `full` texts or `{full, short}` pairs; the short form with probability `shorten`) is attached to every
    user turn while `init_from` samples the replies; the written records (`output`) keep it in the first turn only
    and learn only the last reply (one record per assistant turn with `all_turns`)."""

    init_from: str | None = None
    dialogs: str = ""
    instructions: str = ""
    output: str = ""
    max_combined: int = 2
    shorten: float = 0.5
    all_turns: bool = True
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.max_combined < 1 or not 0 <= self.shorten <= 1:
            raise ConfigError(f"gatt.max_combined must be >= 1 ({self.max_combined}) and gatt.shorten in [0, 1] "
                              f"({self.shorten})")


@dataclass
class DistillConfig:
    """Knowledge distillation (`python -m llama_jax distill`): the student (the `model` section, or `train.init_from`)
    learns from the frozen `teacher` (any checkpoint format) with loss `alpha * T^2 * KL(teacher_T || student_T) +
    (1 - alpha) * CE(student, next token)`, where `_T` are the softmaxes at `temperature` T; `hidden_weight` > 0 adds
    that times the mean squared error between the teacher's final hidden states and the student's (through a learned
    `dim_student x dim_teacher` projection when the widths differ)."""

    teacher: str | None = None
    alpha: float = 0.5
    temperature: float = 2.0
    hidden_weight: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"distill.alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature must be positive, got {self.temperature}")
        if self.hidden_weight < 0:
            raise ConfigError(f"distill.hidden_weight must not be negative, got {self.hidden_weight}")


@dataclass
class Config:
    model: LlamaConfig = field(default_factory=lambda: LlamaConfig.preset("tiny"))
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    ppo: PpoConfig = field(default_factory=PpoConfig)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    gatt: GattConfig = field(default_factory=GattConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


EXECUTION_FIELDS = tuple(f.name for f in dataclasses.fields(ExecutionConfig))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise a one-line ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=f"{key}.")
    if origin is list:
        if isinstance(value, str):
            value = load_yaml(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint in (int, float):
        try:
            number = float(value) if isinstance(value, str) else value
            if hint is int and (isinstance(number, bool) or float(number) != int(number)):
                raise ValueError
            return hint(number)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a{'n integer' if hint is int else ' number'}, got {value!r}") from None
    if hint is str:
        return str(value)
    return value


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys with a suggestion."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    data = dict(data)
    preset = data.pop("preset", None) if cls is LlamaConfig else None
    for key in data:
        if key in names:
            continue
        if cls is LlamaConfig and key in EXECUTION_FIELDS:
            raise ConfigError(f"'{prefix}{key}' is an execution setting, not architecture; write it as execution.{key}")
        raise ConfigError(f"unknown config key '{prefix}{key}'{nearest(key, names, prefix)}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    if preset is not None:
        return LlamaConfig.preset(str(preset), **kwargs)
    return cls(**kwargs)


def apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings to a nested dict (values parsed as YAML scalars)."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value, e.g. optim.lr=1e-3")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {} if child is None else _as_dict(child)
                node[part] = child
            node = child
        try:
            node[parts[-1]] = load_yaml(value) if value != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({str(err).splitlines()[0]}); quote "
                              "it or fix the brackets") from None
    return raw


def _as_dict(value: Any) -> dict[str, Any]:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config (or defaults when `path` is None) and apply `key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' not found; pass an existing YAML file to --config")
        try:
            raw = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must hold sections (model:, data:, train:, ...), not a "
                              f"{type(raw).__name__}")
    return from_dict(Config, apply_overrides(raw, overrides))


def stored_model_section(raw: dict[str, Any]) -> tuple[LlamaConfig, ExecutionConfig]:
    """Architecture and execution from a model section written before they were split (one flat dict)."""
    arch = {k: v for k, v in raw.items() if k not in EXECUTION_FIELDS}
    execution = {k: v for k, v in raw.items() if k in EXECUTION_FIELDS}
    return from_dict(LlamaConfig, arch, "model."), from_dict(ExecutionConfig, execution, "execution.")
