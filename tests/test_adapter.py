"""The adapter model: heads, training noise, and the safetensors round trip with its guard rails."""

import pytest
import torch
import torch.nn.functional as F

from ovml.pipeline.adapter import Adapter, AdapterConfig, load_adapter, perturb, pool_tokens, save_adapter
from ovml.pipeline.errors import OvmlError

DIM = 16


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def adapter(clip: str = "ovml-tiny:random", **settings) -> Adapter:
    return Adapter(AdapterConfig(dim=DIM, clip=clip, vocabulary=["dog", "cat"], **settings))


def trained_looking(model: Adapter) -> Adapter:
    """Weights moved off their zero start, as after training."""
    torch.manual_seed(1)
    for p in model.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_logits_have_one_column_per_label_for_any_label_list():
    model = adapter(hidden=32).eval()
    x = unit(5, DIM)
    assert model(x, unit(3, DIM, seed=1)).shape == (5, 3)
    assert model(x, unit(40, DIM, seed=2)).shape == (5, 40)


def test_untrained_adapter_is_zero_shot_clip():
    model = adapter(hidden=32, scale=20.0).eval()
    x, labels = unit(5, DIM), unit(7, DIM, seed=1)
    assert torch.allclose(model(x, labels), 20.0 * x @ labels.T, atol=1e-6)


def test_cosine_head_ignores_the_input_norm_and_magnitude_head_keeps_it():
    x, labels = unit(5, DIM), unit(7, DIM, seed=1)
    cosine = adapter(hidden=32, head="cosine").eval()
    magnitude = adapter(hidden=32, head="magnitude").eval()
    assert torch.allclose(cosine(3 * x, labels), cosine(x, labels), atol=1e-5)
    assert torch.allclose(magnitude(3 * x, labels), 3 * magnitude(x, labels), atol=1e-5)


def test_noise_has_the_requested_per_dimension_standard_deviation():
    x = unit(2000, 64)
    noisy = perturb(x, 0.05, renorm=False, generator=torch.Generator().manual_seed(0))
    assert abs((noisy - x).std().item() - 0.05) < 0.002


def test_renorm_puts_noisy_embeddings_back_on_the_unit_sphere():
    noisy = perturb(unit(10, DIM), 0.3, renorm=True, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(noisy.norm(dim=-1), torch.ones(10), atol=1e-5)


def test_zero_noise_leaves_embeddings_unchanged():
    x = unit(10, DIM)
    assert torch.equal(perturb(x, 0.0, renorm=False, generator=torch.Generator()), x)


def test_saved_adapter_loads_in_eval_mode_with_identical_logits(tmp_path):
    model = trained_looking(adapter(hidden=32, head="magnitude", scale=7.0))
    save_adapter(tmp_path, model)
    loaded, config = load_adapter(tmp_path, "ovml-tiny:random", DIM)
    x, labels = unit(5, DIM), unit(7, DIM, seed=1)
    assert not loaded.training
    assert config == model.config
    assert torch.equal(loaded(x, labels), model(x, labels))


def test_loading_with_another_clip_model_is_a_one_line_error(tmp_path):
    model = adapter(clip="ViT-B-16:openai", hidden=32)
    save_adapter(tmp_path, model)
    with pytest.raises(OvmlError, match="made with CLIP 'ViT-B-16:openai', not 'ViT-B-32:openai'") as e:
        load_adapter(tmp_path, "ViT-B-32:openai", DIM)
    assert "\n" not in str(e.value)


def test_loading_with_another_embedding_size_is_a_one_line_error(tmp_path):
    model = adapter(hidden=32)
    save_adapter(tmp_path, model)
    with pytest.raises(OvmlError, match=f"expects {DIM}-d embeddings, got 512-d") as e:
        load_adapter(tmp_path, "ovml-tiny:random", 512)
    assert "\n" not in str(e.value)


def test_loading_from_a_folder_without_an_adapter_says_how_to_make_one(tmp_path):
    with pytest.raises(OvmlError, match="ovml train-adapter"):
        load_adapter(tmp_path / "adapter", "ovml-tiny:random", DIM)


def test_softmax_pooling_lies_between_the_mean_and_the_max_of_the_real_tokens():
    z = torch.tensor([[[1.0], [3.0], [99.0]]])  # one row, tokens 1 and 3 real, the third is padding
    pooled = pool_tokens(z, torch.tensor([[True, True, False]]), "softmax", top_k=2).item()
    weights = torch.softmax(torch.tensor([1.0, 3.0]), dim=0)
    assert pooled == pytest.approx(float(weights @ torch.tensor([1.0, 3.0])))
    assert 2.0 < pooled < 3.0


def test_top_k_pooling_averages_the_k_best_real_tokens_and_fewer_when_a_row_is_short():
    z = torch.tensor([[[1.0], [3.0], [2.0]], [[5.0], [99.0], [99.0]]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert pool_tokens(z, mask, "top-k", top_k=2)[:, 0].tolist() == [2.5, 5.0]


def test_a_row_without_tokens_pools_to_zero_with_a_finite_gradient():
    z = torch.tensor([[[1.0], [2.0]], [[4.0], [8.0]]], requires_grad=True)
    mask = torch.tensor([[False, False], [True, True]])
    for pooling in ("softmax", "top-k"):
        pooled = pool_tokens(z, mask, pooling, top_k=2)
        assert pooled[0, 0].item() == 0.0
        grad, = torch.autograd.grad(pooled.sum(), z)
        assert torch.isfinite(grad).all() and (grad[0] == 0).all()


def test_an_adapter_without_a_local_head_has_only_the_global_weights():
    assert set(adapter().state_dict()) == {"bias", "mlp.0.weight", "mlp.0.bias", "mlp.3.weight", "mlp.3.bias"}


def test_an_untrained_local_head_scores_tokens_as_pooled_zero_shot():
    model = adapter(local_pooling="top-k", local_top_k=1, scale=10.0).eval()
    tokens, labels = unit(3, 4, DIM), unit(2, DIM, seed=1)
    expected = (10.0 * tokens @ labels.T).max(dim=1).values
    assert torch.allclose(model.local_logits(model.local_features(tokens), labels), expected, atol=1e-5)


def test_a_local_head_survives_the_safetensors_round_trip(tmp_path):
    model = trained_looking(adapter(local_pooling="softmax"))
    save_adapter(tmp_path, model)
    loaded, config = load_adapter(tmp_path, "ovml-tiny:random", DIM)
    tokens, labels = unit(3, 4, DIM), unit(2, DIM, seed=1)
    assert config.local_pooling == "softmax"
    assert torch.equal(loaded.local_logits(loaded.local_features(tokens), labels),
                       model.local_logits(model.local_features(tokens), labels))
