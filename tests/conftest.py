import os

# Tests run on CPU, with float32 matmuls at full precision so tolerances mean what they say.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_checkpoint():
    from sparda_jax.weights import load_checkpoint

    return load_checkpoint()


@pytest.fixture(scope="session")
def smollm2_model(smollm2_checkpoint):
    from sparda_jax.model import build_model

    return build_model(smollm2_checkpoint.weights, smollm2_checkpoint.config)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_checkpoint):
    from sparda_jax.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_checkpoint)


@pytest.fixture(scope="session")
def tiny_engine_model():
    """3 layers, GQA 4/2, head_dim 8: the engine tests (offload and fused) compare against the resident model on it."""
    from flax import nnx

    from sparda_jax.config import ModelConfig
    from sparda_jax.model import Transformer

    config = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                         num_kv_heads=2, head_dim=8, max_context=2048)
    return Transformer(config, rngs=nnx.Rngs(3))


@pytest.fixture
def fake_h100(monkeypatch):
    """Lets kernels lower to Triton IR for an H100 without a GPU, by faking the GPU-info query of jax's Triton
    lowering (a private jax module): if that module changes, the test is skipped rather than failed."""
    try:
        import jax._src.pallas.triton.pallas_call_registration as reg
        from jax.experimental.pallas.triton import GpuVersion, get_gpu_info_from_version

        info = get_gpu_info_from_version(GpuVersion.H100)
        monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info", lambda: info)
    except Exception as e:  # pragma: no cover - depends on jax internals
        pytest.skip(f"cannot fake the GPU for the Triton lowering: {e}")
