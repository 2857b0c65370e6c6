"""Reading and writing Hugging Face checkpoint directories: config.json plus *.safetensors,
single file or sharded (model.safetensors.index.json), experts in bf16 form or MXFP4.

model.py holds the parameter names (the HF names, "model." aside), the bf16-form [in, out]
layout and Transformer.from_pretrained / save_pretrained; this file holds what they use: the
config.json reader, MXFP4 dequantisation (SPEC section 2), which file holds which tensor, the
name and shape checks, and the sharded writer.
"""

import dataclasses
import json
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def read_config(path: str, config_class):
    """config_class (model.ModelConfig) from an HF config.json, whose rope settings are
    `rope_parameters`, or the legacy `rope_scaling` + `rope_theta`. ValueError names the file."""
    try:
        with open(path) as file:
            raw = json.load(file)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read config {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"config {path}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("model_type", "gpt_oss") != "gpt_oss":
        raise ValueError(f"config {path}: model_type is {raw['model_type']!r}, expected 'gpt_oss'")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
               if k not in raw]
    if missing:
        raise ValueError(f"config {path}: missing required field(s) {missing}")
    for field in ("rope_parameters", "rope_scaling"):
        if raw.get(field) is not None and not isinstance(raw[field], dict):
            raise ValueError(f"config {path}: {field} must be a JSON object (rope_type, factor, ...), got "
                             f"{type(raw[field]).__name__} {raw[field]!r}")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope = {"rope_theta": raw.get("rope_theta", 150000.0), **rope}
    rope.setdefault("truncate", False)  # transformers defaults a missing key to True: GPT-OSS is False
    known = {f.name for f in dataclasses.fields(config_class)} - {"rope_parameters"}
    try:
        return config_class(**{k: v for k, v in raw.items() if k in known}, rope_parameters=rope)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config {path}: {e}") from e


# MXFP4: the released experts' format

FP4_VALUES = [+0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
MXFP4_EXPERT_TENSORS = ("gate_up_proj", "down_proj")


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """MXFP4 -> dense. blocks (..., G, 16) uint8, scales (..., G) uint8 -> (..., G * 32).

    Each byte holds two e2m1 codes, low nibble first; each block of 32 values shares one
    power-of-two scale 2^(scale - 127). Exact: every result is representable in bf16.
    """
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    low, high = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]  # (..., G, 16) each
    values = torch.stack((low, high), dim=-1).flatten(-2)  # (..., G, 32): element 2i low, 2i+1 high
    values = torch.ldexp(values, (scales.to(torch.int32) - 127).unsqueeze(-1).to(dtype))
    return values.flatten(-2)


PICKLE_FILES = (".bin", ".pt", ".pth", ".ckpt")


def open_safetensors(path: str):
    """safe_open, with an error that names the file (safetensors' own names none)."""
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # SafetensorError (truncated, damaged), OSError (missing, unreadable)
        raise ValueError(f"cannot read {path}: {e} (a truncated or damaged safetensors file?)") from e


def read_weight_map(path: str) -> dict[str, str]:
    """Tensor name -> file, from model.safetensors.index.json, else from the files' headers
    (model.safetensors, or every *.safetensors when it is not there). A directory with only
    pickle files (pytorch_model.bin) is refused: unpickling runs whatever code the file holds."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as file:
                return dict(json.load(file)["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read the index {index}: {e!r}") from e
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        raise ValueError(f"cannot read checkpoint directory {path}: {e.strerror}") from e
    files = [f for f in names if f.endswith(".safetensors")]
    files = ["model.safetensors"] if "model.safetensors" in files else files
    if not files:
        pickles = [f for f in names if f.endswith(PICKLE_FILES)]
        why = (f"only pickle files ({', '.join(pickles)}), which are not loaded: unpickling can run "
               "arbitrary code; convert them to safetensors first" if pickles else "no *.safetensors files")
        raise ValueError(f"checkpoint {path} has {why}")
    weight_map = {}
    for fname in files:
        with open_safetensors(os.path.join(path, fname)) as file:
            weight_map.update({k: fname for k in file.keys()})
    return weight_map


class CheckpointReader:
    """Tensor-by-tensor access to the safetensors files of an HF directory; every error names the
    file and the tensor, and non-finite weights are refused by name."""

    def __init__(self, path: str):
        self.path, self.weight_map = path, read_weight_map(path)
        self.files = {fname: open_safetensors(os.path.join(path, fname))
                      for fname in sorted(set(self.weight_map.values()))}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.files.clear()

    def _mxfp4_name(self, name: str) -> str | None:
        """'...experts.gate_up_proj' -> its MXFP4 base name when the checkpoint stores blocks."""
        if name.endswith(MXFP4_EXPERT_TENSORS) and name + "_blocks" in self.weight_map:
            return name
        return None

    def check_names(self, params: dict):
        expected = set()
        for name in params:
            if self._mxfp4_name(name):
                expected |= {name + "_blocks", name + "_scales"}
            else:
                expected.add(name)
        missing = sorted(expected - set(self.weight_map))
        unexpected = sorted(set(self.weight_map) - expected)
        if missing:
            shapes = {n: tuple(params[n].shape) for n in missing if n in params}
            raise ValueError(f"checkpoint {self.path} is missing {len(missing)} tensor(s): "
                             + ", ".join(f"{n} (expected shape {shapes.get(n, '?')})" for n in missing[:8]))
        if unexpected:
            raise ValueError(f"checkpoint {self.path} has {len(unexpected)} unexpected tensor(s): "
                             + ", ".join(unexpected[:8]))

    def copy_into(self, params: dict):
        """Copy every tensor into its parameter (HF name -> parameter), after check_names."""
        self.check_names(params)
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(self.load(name, tuple(param.shape), param.dtype))

    def where(self, name: str) -> str:
        """'<file>: tensor <name>', the prefix of every error about one tensor."""
        return f"{os.path.join(self.path, self.weight_map[name])}: tensor {name}"

    def _get(self, name: str) -> torch.Tensor:
        try:
            return self.files[self.weight_map[name]].get_tensor(name)
        except Exception as e:  # a file damaged after its header, or changed since it was opened
            raise ValueError(f"{self.where(name)} cannot be read: {e}") from e

    def load(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """The tensor `name` as `dtype`, checked against the expected (bf16-form) shape and for
        non-finite values (NaN weights would otherwise load silently and sample garbage)."""
        if self._mxfp4_name(name):
            tensor = self._load_mxfp4(name, shape, dtype)
        else:
            tensor = self._get(name)
            if not tensor.is_floating_point():
                raise ValueError(f"{self.where(name)} has dtype {tensor.dtype}, expected a floating-point dtype")
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{self.where(name)} has shape {tuple(tensor.shape)}, expected {shape}")
        tensor = tensor.to(dtype)
        bad = int((~torch.isfinite(tensor)).sum())  # after the cast: an overflow to inf counts too
        if bad:
            raise ValueError(f"{self.where(name if name in self.weight_map else name + '_blocks')} has {bad} "
                             f"non-finite value(s) (NaN or inf) of {tensor.numel()}")
        return tensor

    def _load_mxfp4(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        E, n_in, n_out = shape  # the bf16 form is [in, out]; MXFP4 stores [out, in]
        blocks, scales = self._get(name + "_blocks"), self._get(name + "_scales")
        for tensor, suffix in ((blocks, "_blocks"), (scales, "_scales")):
            if tensor.dtype != torch.uint8:
                raise ValueError(f"{self.where(name + suffix)} has dtype {tensor.dtype}, expected torch.uint8")
        want_blocks, want_scales = (E, n_out, n_in // 32, 16), (E, n_out, n_in // 32)
        if tuple(blocks.shape) != want_blocks or tuple(scales.shape) != want_scales:
            raise ValueError(f"{self.where(name + '_blocks')}/_scales have shapes {tuple(blocks.shape)}/"
                             f"{tuple(scales.shape)}, expected {want_blocks}/{want_scales}")
        # One expert at a time keeps the temporaries small for 20B/120B checkpoints.
        return torch.stack([dequantize_mxfp4(blocks[e], scales[e], dtype).T for e in range(E)])


def save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict | None = None):
    """safetensors' save_file, whose I/O errors (a full disk, a read-only directory) come as
    SafetensorError "... (os error N)": raised here as the OSError they are, with the file's name."""
    try:
        save_file(tensors, path, metadata=metadata)
    except Exception as e:
        found = re.search(r"os error (\d+)", str(e))
        if found is None or isinstance(e, OSError):
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), path) from e


def write_safetensors(tensors: dict[str, torch.Tensor], path: str, max_shard_bytes: int):
    """tensors -> model.safetensors, or shards of at most max_shard_bytes (a tensor larger than
    that gets a shard of its own) with a model.safetensors.index.json that maps names to files."""
    shards, size = [{}], 0
    for name, tensor in tensors.items():
        if size and size + tensor.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    if len(shards) == 1:
        save_safetensors(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(tensor.nbytes for tensor in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as file:
        json.dump(index, file, indent=2)
