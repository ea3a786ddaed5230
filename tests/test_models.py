"""DecoderLM: loss at init, parameter groups, tying, FLOPs, overfitting, config validation."""

from __future__ import annotations

import ast
import dataclasses
import math
import sys
import typing
from pathlib import Path

import omegaconf
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from models import ATTENTION_KINDS, AttentionConfig, DecoderLM, ModelConfig
from models.config import MoEConfig

SMALL = dict(vocab_size=256, seq_len=32, d_model=32, n_layers=2, n_heads=2)


def small_attention(kind: str, **overrides) -> AttentionConfig:
    settings = dict(kind=kind, chunk_size=8, nb_features=16, shared_dim=16)
    settings.update(overrides)
    return AttentionConfig(**settings)


def build(kind: str = "softmax", seed: int = 0, attn: dict | None = None, **model) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(ModelConfig(**{**SMALL, **model}), small_attention(kind, **(attn or {})))


def tokens(*shape, seed=0):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_loss_at_init_is_log_vocab(kind):
    model = build(kind, d_model=64)
    logits, loss = model(tokens(4, 32, seed=1), tokens(4, 32, seed=2))
    assert logits.shape == (4, 32, 256)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - math.log(256)) < 0.1


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_logits_are_causal(kind):
    model = build(kind).eval()
    idx = tokens(2, 20, seed=3)
    changed = idx.clone()
    changed[:, 11:] = (changed[:, 11:] + 1) % 256
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert_close(a[:, :11], b[:, :11], atol=1e-5, rtol=0)
    assert (a[:, 11:] - b[:, 11:]).abs().max() > 1e-4


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_param_groups_cover_every_parameter_once(kind, tie):
    model = build(kind, tie_embeddings=tie, attn=dict(rope=kind != "linear"))  # linear: learned positions
    decay, no_decay = model.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    grouped = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters()}
    decay_ids = {id(p) for p in decay["params"]}
    # Norm gains, embeddings, GAU's scale/offset, TransNormer's gain: never decayed.
    not_linear = [p for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)]
    assert not_linear and not any(id(p) in decay_ids for p in not_linear)
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    assert decay_ids == linear_weights - {id(model.tok_emb.weight)}
    assert (id(model.lm_head.weight) in decay_ids) == (not tie)
    assert id(model.tok_emb.weight) not in decay_ids


def test_param_groups_drive_an_optimizer():
    model = build("gau")
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-3)  # would raise on a duplicated parameter
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_tied_embeddings_share_one_tensor():
    tied, untied = build(tie_embeddings=True), build(tie_embeddings=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert tied.num_params(non_embedding=False) == untied.num_params(non_embedding=False) - 256 * 32
    _, loss = tied(tokens(2, 8), tokens(2, 8, seed=1))
    loss.backward()
    grad = tied.tok_emb.weight.grad
    # The head's gradient lands on every row; the lookup's only on rows used as inputs. Both arrive.
    assert grad is not None and (grad != 0).all()


def test_num_params_and_flops_match_palm_for_softmax():
    L, d, H, V, T = 3, 48, 4, 256, 64
    for tie in (True, False):
        model = build("softmax", n_layers=L, d_model=d, n_heads=H, seq_len=T, tie_embeddings=tie)
        per_layer = 4 * d * d + 2 * d * 4 * d + 2 * d  # q,k,v,out + MLP up/down + two norm gains
        total = L * per_layer + d + V * d + (0 if tie else V * d)  # + final norm, embedding, untied head
        assert model.num_params(non_embedding=False) == total
        # Non-embedding N keeps the matrix the head multiplies by (tied or not), drops the lookup table.
        N = total - (0 if tie else V * d)
        assert model.num_params(non_embedding=True) == N
        assert model.flops_per_token(T) == 6 * N + 12 * L * H * (d // H) * T


def test_flops_counts_gau_and_learned_positions():
    model = build("gau", attn=dict(rope=False))
    N = sum(p.numel() for p in model.parameters()) - model.pos_emb.weight.numel()
    assert model.num_params() == N
    attention = sum(b.attn.flops_per_token(32) for b in model.blocks)
    assert attention > 0
    assert model.flops_per_token(32) == 6 * N + 3 * attention
    assert all(b.mlp is None and b.mlp_norm is None for b in model.blocks)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_overfits_a_tiny_batch(kind):
    model = build(kind, dropout=0.0)
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=1e-2)
    data = tokens(4, 17, seed=5)
    x, y = data[:, :-1], data[:, 1:]
    losses = []
    for step in range(30):
        model.set_step(step)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_bf16_autocast_model_loss_close_to_fp32(kind):
    model = build(kind)
    idx, targets = tokens(2, 24, seed=6), tokens(2, 24, seed=7)
    with torch.no_grad():
        _, exact = model(idx, targets)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, low = model(idx, targets)
    assert logits.dtype == torch.bfloat16 and low.dtype == torch.float32
    assert abs(low.item() - exact.item()) < 1e-2


def test_set_step_redraws_every_performer_layer():
    model = build("performer", attn=dict(redraw_interval=2), n_layers=3)
    before = [b.attn.projection.clone() for b in model.blocks]
    assert not torch.equal(before[0], before[1])  # seeded per layer
    model.set_step(1)
    assert all(torch.equal(b.attn.projection, p) for b, p in zip(model.blocks, before))
    model.set_step(2)
    assert all(not torch.equal(b.attn.projection, p) for b, p in zip(model.blocks, before))
    other = build("performer", seed=9, attn=dict(redraw_interval=2), n_layers=3)
    other.set_step(2)  # another rank: different init seed, same draw
    assert all(torch.equal(a.attn.projection, b.attn.projection) for a, b in zip(model.blocks, other.blocks))


def test_same_seed_same_weights_and_init_scale():
    a, b = build("linear", seed=3), build("linear", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    model = build("softmax", d_model=128, n_layers=8, init_std=0.02)
    assert model.blocks[0].mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.down_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.blocks[0].attn.out_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_rejects_sequences_longer_than_the_context():
    model = build(seq_len=16)
    with pytest.raises(ValueError, match="idx"):
        model(tokens(1, 17))
    with pytest.raises(ValueError, match="idx"):
        model(tokens(17))
    logits, loss = model(tokens(1, 16))
    assert logits.shape == (1, 16, 256) and loss is None


@pytest.mark.parametrize("model_overrides, attn_overrides, field", [
    (dict(d_model=30, n_heads=4), {}, "model.d_model"),
    (dict(d_model=12, n_heads=4), {}, "model.n_heads"),  # head dim 3: odd, RoPE needs pairs
    (dict(vocab_size=0), {}, "model.vocab_size"),
    (dict(seq_len=0), {}, "model.seq_len"),
    (dict(n_layers=0), {}, "model.n_layers"),
    (dict(dropout=1.0), {}, "model.dropout"),
    (dict(init_std=0.0), {}, "model.init_std"),
    (dict(mlp_ratio=0.0), {}, "model.mlp_ratio"),
    (dict(norm_eps=-1.0), {}, "model.norm_eps"),
    ({}, dict(kind="bogus"), "attention.kind"),
    ({}, dict(chunk_size=0), "attention.chunk_size"),
    ({}, dict(nb_features=0), "attention.nb_features"),
    ({}, dict(redraw_interval=-1), "attention.redraw_interval"),
    ({}, dict(kind="gau", shared_dim=7), "attention.shared_dim"),
    ({}, dict(expansion=0), "attention.expansion"),
    ({}, dict(rope_theta=0.0), "attention.rope_theta"),
    ({}, dict(eps=0.0), "attention.eps"),
])
def test_bad_config_names_the_field(model_overrides, attn_overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        DecoderLM(ModelConfig(**{**SMALL, **model_overrides}), small_attention(attn_overrides.pop("kind", "softmax"),
                                                                               **attn_overrides))


def test_odd_head_dim_is_fine_without_rope():
    model = DecoderLM(ModelConfig(**{**SMALL, "d_model": 12, "n_heads": 4}), small_attention("linear", rope=False))
    assert model(tokens(1, 5))[0].shape == (1, 5, 256)


def test_configs_hold_only_omegaconf_friendly_fields():
    """int/float/bool/str, or a Literal of strings: with Literal relaxed to str, OmegaConf takes them."""
    assert typing.get_args(typing.get_type_hints(AttentionConfig)["kind"]) == ATTENTION_KINDS
    for cls in (ModelConfig, AttentionConfig, MoEConfig):
        fields = []
        for name, hint in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(hint):  # a nested group (model.moe), checked as its own class
                continue
            if typing.get_origin(hint) is typing.Literal:
                assert all(isinstance(c, str) for c in typing.get_args(hint)), name
                hint = str
            assert hint in (int, float, bool, str), (cls.__name__, name, hint)
            fields.append((name, hint, dataclasses.field(default=getattr(cls(), name))))
        mirror = dataclasses.make_dataclass(cls.__name__ + "Mirror", fields)
        cfg = omegaconf.OmegaConf.structured(mirror)
        assert cls(**omegaconf.OmegaConf.to_container(cfg)) == cls()


def test_models_imports_only_torch_and_stdlib():
    # docs/design.md: models never imports trainer (nor parallel)
    root = Path(__file__).resolve().parents[1] / "models"
    for path in root.rglob("*.py"):
        allowed = set(sys.stdlib_module_names) | {"torch", "models"}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
