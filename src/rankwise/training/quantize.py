"""QLoRA: load the base model quantised by bitsandbytes (4-bit NF4/FP4 or 8-bit), its heads kept in full precision.

Quantisation is an option of LOADING the base model, not a training method: `tasks.load_model(...,
quantization=QuantSpec)` passes a BitsAndBytesConfig to `from_pretrained`, then `prepare` runs peft's
`prepare_model_for_kbit_training`. Plans never read quantised weights: uniform plans need only layer shapes
(`in_features`/`out_features` survive quantisation), and strategies measure the full-precision checkpoint folder.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from ..targets import HEAD_NAMES
from ..types import RankwiseError

__all__ = ["QUANTIZE", "QUANT_TYPES", "COMPUTE_DTYPES", "MIN_BITSANDBYTES", "QuantSpec", "quant_spec",
           "run_quantization", "require_bitsandbytes", "keep_float_modules", "load_kwargs", "check_quantized",
           "same_kernels", "prepare", "quantized_layers", "count_params", "model_memory", "head_modules",
           "outer_heads"]

QUANTIZE = ("4bit", "8bit")
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
MIN_BITSANDBYTES = "0.45"
_INSTALL = "pip install 'rankwise[qlora]' (bitsandbytes>=0.45)"


@dataclass(frozen=True)
class QuantSpec:
    """How the base model's linear layers are stored while training: recorded in results.json and task.json."""

    bits: int  # 4 or 8
    quant_type: str | None = "nf4"  # 4-bit only: nf4 (QLoRA's normal float) or fp4
    double_quant: bool = False  # 4-bit only: quantise the quantisation constants too (~0.4 bit/param less)
    compute_dtype: str = "float32"  # 4-bit only: dtype the weights are dequantised to for each matmul

    @property
    def label(self) -> str:
        return f"{self.bits}-bit {self.quant_type}" if self.bits == 4 else "8-bit (LLM.int8)"

    def to_dict(self) -> dict:
        return {"method": "bitsandbytes", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict | None) -> "QuantSpec | None":
        if not d:
            return None
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def quant_spec(quantize: str | None, quant_type: str | None = None, double_quant: bool = False,
               compute_dtype: str | None = None) -> QuantSpec | None:
    """The `--quantize/--quant-type/--double-quant/--compute-dtype` flags -> a QuantSpec (None: full precision)."""
    if quantize is None:
        if quant_type is not None or double_quant or compute_dtype is not None:
            raise RankwiseError("--quant-type/--double-quant/--compute-dtype need --quantize 4bit")
        return None
    if quantize not in QUANTIZE:
        raise RankwiseError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if quantize == "8bit":
        if quant_type is not None or double_quant or compute_dtype is not None:
            raise RankwiseError("--quant-type/--double-quant/--compute-dtype are 4-bit options; "
                                "8-bit (LLM.int8) has none")
        return QuantSpec(bits=8, quant_type=None, compute_dtype="float32")
    if quant_type is not None and quant_type not in QUANT_TYPES:
        raise RankwiseError(f"--quant-type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise RankwiseError(f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    return QuantSpec(bits=4, quant_type=quant_type or "nf4", double_quant=bool(double_quant),
                     compute_dtype=compute_dtype or "float32")


def run_quantization(method, preset: str | None, quantize: str | None, quant_type: str | None = None,
                     double_quant: bool = False, compute_dtype: str | None = None) -> QuantSpec | None:
    """A training run's QuantSpec (None: full precision); the qlora_* presets imply 4-bit. Checked before any
    model loads: the flags, the method's support, and bitsandbytes itself."""
    from .presets import PRESET_QUANTIZE

    spec = quant_spec(quantize or PRESET_QUANTIZE.get(preset), quant_type, double_quant, compute_dtype)
    if spec is not None:
        if not method.supports_quantization:
            raise RankwiseError(f"--quantize works with --method lora; method {method.name!r} cannot train on a "
                                "quantised base model")
        require_bitsandbytes()
    return spec


def require_bitsandbytes() -> None:
    """Fail in under a second, before any data is read, when bitsandbytes is missing or too old."""
    # Its CPU backend logs a warning on import about an optional `kernels` package, and 8-bit matmuls log on every
    # call that float32 inputs are cast to float16 (documented in docs/qlora.md): nothing a user can act on.
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise RankwiseError(f"--quantize needs bitsandbytes, which is not installed: {_INSTALL}") from None
    from packaging.version import Version

    if Version(bitsandbytes.__version__) < Version(MIN_BITSANDBYTES):
        raise RankwiseError(f"--quantize needs bitsandbytes>={MIN_BITSANDBYTES}, found "
                            f"{bitsandbytes.__version__}: {_INSTALL}")


def outer_heads(model) -> list[str]:
    """The children with weights outside the backbone (`base_model_prefix`): the heads that a checkpoint saved for
    another task lacks, so loading it initialises them anew. Empty when the model is its own backbone."""
    prefix = getattr(model, "base_model_prefix", "")
    children = dict(model.named_children())
    if prefix not in children:
        return []
    return [n for n, m in children.items() if n != prefix and any(True for _ in m.parameters())]


def head_modules(model) -> list[str]:
    """Fully qualified names of a task model's heads, found by structure, not by name: every child with weights
    outside the backbone (`base_model_prefix`: classifier, score, lm_head, BART's classification_head, ...), the
    output embeddings (by identity), and the backbone's pooler (trained with the classifier). Outermost names."""
    prefix = getattr(model, "base_model_prefix", "")
    children = dict(model.named_children())
    names = outer_heads(model)
    if prefix in children:  # else the model is its own backbone: its only head is the output embeddings
        names += [f"{prefix}.{n}" for n, _ in children[prefix].named_children() if n in HEAD_NAMES]
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        names += [n for n, m in model.named_modules() if m is out]
    names = list(dict.fromkeys(names))
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def keep_float_modules(path: str, task: str) -> list[str]:
    """The heads of `path`'s task model (head_modules), which must stay unquantised: they are trained in full
    (modules_to_save) or tied to the embeddings, and a quantised head cannot require gradients. Found on a
    weightless (meta-device) copy of the task model, so no weight is read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        skeleton = auto.from_config(config)
    return head_modules(skeleton)


def load_kwargs(spec: QuantSpec, path: str, task: str, device: str | None) -> dict:
    """`from_pretrained` keyword arguments that load `path` quantised as `spec`, heads kept in float."""
    import torch
    from transformers import BitsAndBytesConfig

    require_bitsandbytes()
    skip = keep_float_modules(path, task)
    if spec.bits == 8:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type,
                                    bnb_4bit_use_double_quant=spec.double_quant,
                                    bnb_4bit_compute_dtype=getattr(torch, spec.compute_dtype),
                                    llm_int8_skip_modules=skip)
    # bitsandbytes quantises while loading, on the device it loads to; the Trainer never moves a quantised model
    return {"quantization_config": config, "device_map": {"": device or "cpu"}}


def quantized_layers(model) -> list[str]:
    """Names of the bitsandbytes-quantised layers (Linear4bit / Linear8bitLt) in `model`."""
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


def check_quantized(model, spec: QuantSpec, path: str) -> None:
    """Raise unless bitsandbytes quantised something, and no head that must train in float."""
    names = quantized_layers(model)
    if not names:
        raise RankwiseError(f"bitsandbytes quantised no layer of {path} to {spec.label} (it quantises "
                            "torch.nn.Linear and GPT-2 Conv1D layers only); train it without --quantize")
    kept = head_modules(model)
    heads = [n for n in names if any(n == h or n.startswith(h + ".") for h in kept)]
    if heads:
        raise RankwiseError(f"bitsandbytes quantised the task head {heads[0]} of {path}; heads must stay in "
                            "float to be trained; train it without --quantize")


def same_kernels(model) -> None:
    """Make evaluation run the same 4-bit matmul as training.

    On CPUs with AVX512-bf16, bitsandbytes switches Linear4bit layers in eval mode without gradients to a fused
    inference kernel: it repacks the weight in place into a bfloat16 layout (so eval would compute in bf16 while
    training used --compute-dtype), and fails for layers narrower than its 64-value block."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def prepare(model):
    """peft's k-bit preparation: freeze the base, cast its remaining fp16/bf16 parameters (norms, embeddings,
    heads) to float32 for stable training. Gradient checkpointing stays off: it trades compute for activation
    memory independently of quantisation, and is slow on CPU."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def count_params(model) -> int:
    """Parameters as the unquantised model counts them (a packed 4-bit weight holds two values per byte)."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        total += int(state.shape.numel()) if state is not None and hasattr(state, "shape") else p.numel()
    return total


def model_memory(model) -> int:
    """Bytes held by the model's weights: parameters and buffers, quantised weights at their packed size plus
    their quantisation constants (absmax per block, nested constants under --double-quant, 8-bit row scales)."""
    tensors = list(model.parameters()) + list(model.buffers())
    for p in model.parameters():
        if getattr(p, "SCB", None) is not None:  # 8-bit: one float scale per row
            tensors.append(p.SCB)
        state = getattr(p, "quant_state", None)
        while state is not None and hasattr(state, "absmax"):
            tensors += [t for t in (state.absmax, state.code, getattr(state, "offset", None))
                        if hasattr(t, "element_size")]
            state = getattr(state, "state2", None)
    return int(sum(t.numel() * t.element_size() for t in tensors))
