"""model.py against transformers' GptOssForCausalLM (the independent implementation) on tiny
random checkpoints with non-trivial values: large sinks, a window shorter than the sequence,
GQA, biases, sequence lengths that are not powers of two."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_checkpoint
import model
from conftest import randomize_

transformers = pytest.importorskip("transformers")
from transformers import GptOssConfig, GptOssForCausalLM  # noqa: E402
from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

# >= 4 layers of both types, window 5 < T, GQA 4/2, 8 experts top-2.
CFG = model.preset("tiny", num_hidden_layers=4, sliding_window=5)


def hf_config(cfg: model.ModelConfig, **rope_overrides) -> GptOssConfig:
    fields = {key: value for key, value in cfg.to_hf_dict().items() if key not in ("architectures", "model_type")}
    fields["rope_parameters"] = {**fields["rope_parameters"], **rope_overrides}
    hcfg = GptOssConfig(**fields)
    hcfg._attn_implementation = "eager"
    return hcfg


@pytest.fixture(scope="module")
def transformers_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    hf = GptOssForCausalLM(hf_config(CFG)).float().eval()
    randomize_(hf)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    return hf, str(path)


def logsoftmax(logits):
    return torch.log_softmax(logits.float(), dim=-1)


def inputs(B=3, T=13, seed=1):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def test_loads_transformers_checkpoint_and_matches_logprobs(transformers_checkpoint):
    hf, path = transformers_checkpoint
    ours = model.Transformer.from_pretrained(path)
    for T in (13, 7):  # window 5 shorter than both
        x = inputs(T=T)
        with torch.no_grad():
            err = (logsoftmax(ours(x)) - logsoftmax(hf(x).logits)).abs().max().item()
        assert err <= 1e-5, err


def test_save_pretrained_loads_in_transformers(tmp_path):
    ours = model.Transformer(CFG)
    randomize_(ours, seed=3)
    ours.save_pretrained(tmp_path)
    hf = GptOssForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    x = inputs(T=11)
    with torch.no_grad():
        err = (logsoftmax(ours(x)) - logsoftmax(hf(x).logits)).abs().max().item()
    assert err <= 1e-5, err


def test_sharded_checkpoint_roundtrip(tmp_path):
    ours = model.Transformer(CFG)
    randomize_(ours, seed=4)
    ours.save_pretrained(tmp_path, max_shard_bytes=100_000)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    again = model.Transformer.from_pretrained(str(tmp_path))
    for (n, a), b in zip(ours.named_parameters(), again.parameters()):
        assert torch.equal(a, b), n


def random_mxfp4(shape_out_in, gen):
    """Random FP4 codes and scales for a [E, out, in] expert matrix."""
    E, n_out, n_in = shape_out_in
    blocks = torch.randint(0, 256, (E, n_out, n_in // 32, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(118, 125, (E, n_out, n_in // 32), generator=gen, dtype=torch.uint8)
    return blocks, scales


def test_dequantize_mxfp4_worked_examples():
    blocks = torch.tensor([[0x21] + [0] * 15, [0xF9] + [0] * 15], dtype=torch.uint8)
    scales = torch.tensor([127, 129], dtype=torch.uint8)
    out = hf_checkpoint.dequantize_mxfp4(blocks, scales, torch.float32)  # two blocks of 32 values
    assert out.shape == (64,)
    assert out[:2].tolist() == [0.5, 1.0]
    assert out[32:34].tolist() == [-2.0, -24.0]


def test_mxfp4_checkpoint_matches_transformers_dequantiser(transformers_checkpoint, tmp_path):
    hf, path = transformers_checkpoint
    tensors = load_file(os.path.join(path, "model.safetensors"))
    gen = torch.Generator().manual_seed(5)
    E, H, I = CFG.num_local_experts, CFG.hidden_size, CFG.intermediate_size
    dense = {}
    for name in list(tensors):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            n_in, n_out = tensors.pop(name).shape[1:]
            blocks, scales = random_mxfp4((E, n_out, n_in), gen)
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
            dense[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)  # (E, in, out)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())

    ours = model.Transformer.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    names = ours.hf_state_names()
    for name, ref in dense.items():
        assert torch.equal(names[name].detach(), ref), name  # bit for bit
    ours = model.Transformer.from_pretrained(str(tmp_path))  # fp32 for the logits comparison
    with torch.no_grad():
        for name, ref in dense.items():
            hf.get_parameter(name).copy_(ref.float())
        x = inputs(T=12)
        err = (logsoftmax(ours(x)) - logsoftmax(hf(x).logits)).abs().max().item()
    assert err <= 1e-5, err


def test_yarn_inv_freq_matches_transformers_without_truncation():
    hf_inv, hf_scale = ROPE_INIT_FUNCTIONS["yarn"](hf_config(CFG))
    ours, concentration = model.yarn_inv_freq(CFG)
    torch.testing.assert_close(ours.float(), hf_inv, rtol=1e-6, atol=0)
    assert abs(concentration - hf_scale) < 1e-12
    # gpt-oss-20b numbers of SPEC 1
    low, high = model.yarn_bounds(model.preset("gpt-oss-20b"))
    assert (round(low, 4), round(high, 4)) == (8.0928, 17.398)
    assert abs(model.yarn_inv_freq(model.preset("gpt-oss-20b"))[1] - 1.346574) < 1e-6


def test_rounded_yarn_bounds_differ():
    """Guards the shipped bug: rounding low/high changes frequencies by a lot."""
    cfg = model.preset("gpt-oss-20b")
    exact, _ = model.yarn_inv_freq(cfg)
    rounded, _ = model.yarn_inv_freq(cfg, truncate=True)
    hf_rounded, _ = ROPE_INIT_FUNCTIONS["yarn"](hf_config(cfg, truncate=True))
    torch.testing.assert_close(rounded.float(), hf_rounded, rtol=1e-6, atol=0)
    assert ((rounded - exact).abs() / exact).max() > 0.3


def test_preset_parameter_counts():
    assert round(model.count_parameters(model.preset("gpt-oss-20b")) / 1e9, 3) == 20.915
    assert round(model.count_parameters(model.preset("gpt-oss-120b")) / 1e9, 3) == 116.829


def test_config_from_legacy_rope_scaling(tmp_path):
    raw = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 64, "num_local_experts": 4,
           "num_experts_per_tok": 2, "sliding_window": 8, "rope_theta": 150000,
           "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                            "original_max_position_embeddings": 4096},
           "quantization_config": {"quant_method": "mxfp4"}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = model.ModelConfig.from_json(tmp_path / "config.json")
    assert cfg.rope_parameters["truncate"] is False  # absent means False for GPT-OSS
    assert cfg.layer_types == ["sliding_attention", "full_attention"]
    raw["rope_scaling"]["truncate"] = True
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert model.ModelConfig.from_json(tmp_path / "config.json").rope_parameters["truncate"] is True


@pytest.mark.parametrize("change, message", [
    (dict(num_key_value_heads=3), "divisible by num_key_value_heads"),
    (dict(layer_types=["full_attention"]), "layer_types has 1 entries"),
    (dict(rope_parameters={"beta_fast": 1.0, "beta_slow": 32.0}), "YaRN ramp bounds"),
    (dict(num_experts_per_tok=9), "exceeds num_local_experts"),
    (dict(hidden_size=0), "hidden_size must be a positive integer"),
])
def test_config_validation(change, message):
    with pytest.raises(ValueError, match=message):
        model.preset("tiny", **change)


@pytest.fixture
def saved(tmp_path):
    ours = model.Transformer(CFG)
    ours.save_pretrained(tmp_path)
    return tmp_path, load_file(tmp_path / "model.safetensors")


def test_bad_checkpoint_missing_tensor(saved):
    path, tensors = saved
    del tensors["model.layers.1.self_attn.sinks"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing 1 tensor.*layers\.1\.self_attn\.sinks \(expected shape \(4,\)\)"):
        model.Transformer.from_pretrained(str(path))


def test_bad_checkpoint_unexpected_tensor(saved):
    path, tensors = saved
    tensors["model.layers.0.extra"] = torch.zeros(3)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensor.*model\.layers\.0\.extra"):
        model.Transformer.from_pretrained(str(path))


def test_bad_checkpoint_wrong_shape(saved):
    path, tensors = saved
    tensors["model.layers.0.mlp.router.weight"] = torch.zeros(7, 64)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"router\.weight has shape \(7, 64\), expected \(8, 64\)"):
        model.Transformer.from_pretrained(str(path))


def test_bad_checkpoint_wrong_dtype(saved):
    path, tensors = saved
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.norm\.weight has dtype torch\.int32, expected a floating"):
        model.Transformer.from_pretrained(str(path))


def test_bad_checkpoint_mxfp4_dtype(saved):
    path, tensors = saved
    name = "model.layers.0.mlp.experts.down_proj"
    E, I, H = tensors.pop(name).shape
    tensors[name + "_blocks"] = torch.zeros(E, H, I // 32, 16)  # float, should be uint8
    tensors[name + "_scales"] = torch.zeros(E, H, I // 32, dtype=torch.uint8)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"down_proj_blocks has dtype torch\.float32, expected torch\.uint8"):
        model.Transformer.from_pretrained(str(path))


@pytest.mark.parametrize("text, message", [
    ("{not json", "cannot read config"),
    ("[1, 2]", "expected a JSON object"),
    ('{"vocab_size": 10}', "missing required field"),
    ('{"model_type": "llama", "vocab_size": 10}', "expected 'gpt_oss'"),
])
def test_bad_config_json(saved, text, message):
    path, _ = saved
    (path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        model.Transformer.from_pretrained(str(path))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=str)
def test_experts_expert_matmul_matches_per_expert_reference(dtype, tol, monkeypatch):
    """Experts.forward (every expert in one grouped product; float64 one expert at a time) and
    the per-expert loop Experts.reference against Experts.mlp applied pair by pair, forward and
    every gradient; some experts get no token."""
    cfg = model.preset("tiny", num_local_experts=8, num_experts_per_tok=2)
    experts = model.Experts(cfg).to(dtype)
    randomize_(experts, seed=5)
    N = 6  # 12 pairs over 8 experts
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(N, cfg.hidden_size, generator=gen, dtype=dtype, requires_grad=True)
    top, idx = torch.randn(N, 8, generator=gen).topk(2, dim=-1)
    weights = top.softmax(-1).to(dtype)
    calls = []
    grouped_mm = torch.nn.functional.grouped_mm
    monkeypatch.setattr(model.F, "grouped_mm", lambda *a, **kw: calls.append(1) or grouped_mm(*a, **kw))
    got = experts(x, idx, weights)
    assert len(calls) == (2 if dtype == torch.float32 else 0)  # fp32: one call per projection
    ref = torch.stack([sum(weights[n, s] * experts.mlp(int(idx[n, s]), x[n:n + 1])[0] for s in range(2))
                       for n in range(N)])
    assert len(set(idx.flatten().tolist())) < 8  # an expert without rows is skipped correctly
    dout = torch.randn(got.shape, generator=gen, dtype=dtype)
    params = [x] + list(experts.parameters())
    expected = [ref] + list(torch.autograd.grad(ref, params, dout))
    for a, b in zip([got] + list(torch.autograd.grad(got, params, dout)), expected):
        assert (a - b).abs().max() <= tol * b.abs().max().clamp(min=1)


def test_experts_under_bf16_autocast():
    """grouped_mm is not on autocast's list: the experts cast to bf16 themselves, as matmul would."""
    cfg = model.preset("tiny")
    experts = model.Experts(cfg)
    randomize_(experts, seed=7)
    x = torch.randn(5, cfg.hidden_size)
    top, idx = torch.randn(5, cfg.num_local_experts).topk(2, dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = experts(x, idx, top.softmax(-1))
    full = experts(x, idx, top.softmax(-1))
    assert low.dtype == torch.float32
    assert 0 < (low - full).abs().max() <= 3e-2 * full.abs().max()  # bf16 rounding, not fp32


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    net = model.Transformer(CFG)
    randomize_(net)
    x = torch.randint(0, CFG.vocab_size, (4, 24))
    logp = torch.log_softmax(net(x), dim=-1)
    logp[:, :-1].gather(-1, x[:, 1:, None]).mean().backward()
    for name, param in net.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_out_of_range_token_ids_and_positions():
    net = model.Transformer(model.preset("tiny", max_position_embeddings=16))
    with pytest.raises(ValueError, match="token id out of range"):
        net(torch.tensor([[0, CFG.vocab_size]]))
    with pytest.raises(ValueError, match=r"position \(max_position_embeddings\) out of range \[0, 16\)"):
        net(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="position"):
        net(torch.tensor([[1, 2]]), positions=torch.tensor([[15, 16]]))
    net(torch.tensor([[1, 2]]), positions=torch.tensor([[-1, 15]]))  # -1 (padding) and the last position


def test_flash_path_matches_naive_path_and_nosink_does_not(transformers_checkpoint):
    hf, path = transformers_checkpoint
    ours = model.Transformer.from_pretrained(path)
    x = inputs(T=13)
    with torch.no_grad():
        flash = logsoftmax(ours(x))  # the default backend on CPU
        ours.set_attention_backend("naive")
        naive = logsoftmax(ours(x))
        ours.set_attention_backend("nosink")
        nosink = logsoftmax(ours(x))
    assert (flash - naive).abs().max().item() <= 1e-5
    assert (nosink - naive).abs().max().item() > 1e-2  # dropping large sinks is a real error
    with pytest.raises(ValueError, match="unknown attention backend"):
        ours.set_attention_backend("fast")


def test_float64_model_stays_float64(transformers_checkpoint):
    """The ground truth: RMSNorm and the logits are not rounded through fp32 in a float64 model."""
    _, path = transformers_checkpoint
    m64 = model.Transformer.from_pretrained(path, dtype=torch.float64)
    m32 = model.Transformer.from_pretrained(path)
    x = inputs(T=9)
    with torch.no_grad():
        l64, l32 = m64(x), m32(x)
    assert l64.dtype == torch.float64 and l32.dtype == torch.float32
    assert (logsoftmax(l32).double() - torch.log_softmax(l64, -1)).abs().max() < 1e-5
