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
