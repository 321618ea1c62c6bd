"""The next-token loss, eager and under torch.compile (model.compile), against float64 math."""
import pytest
import torch

from lowbit.objectives.base import compiled_token_nll, dense_token_nll, token_nll


def float64_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(logits.double()[:, :-1], dim=-1)
    return -log_probs.gather(-1, input_ids[:, 1:, None]).sum()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", [token_nll, lambda x, i: token_nll(x, i, chunk_rows=10), dense_token_nll,
                                  compiled_token_nll], ids=["chunked", "chunked_10_rows", "dense", "compiled"])
def test_token_nll_equals_float64(loss, dtype):
    """Odd sizes; the last position has no target. Value and gradient against float64 (the gradient in the logits'
    dtype: bf16 rounds it to 2^-8 relative). chunked_10_rows: 111 rows in chunks of 10, the last one short."""
    torch.manual_seed(0)
    logits = (4 * torch.randn(3, 37, 1001)).to(dtype).requires_grad_()
    input_ids = torch.randint(0, 1001, (3, 37))
    reference = logits.detach().clone().requires_grad_()
    want = float64_nll(reference, input_ids)
    want.backward()
    got = loss(logits, input_ids)
    got.backward()
    assert got.dtype == torch.float32
    assert abs(got.item() - want.item()) <= 1e-6 * abs(want.item())
    tolerance = 1e-6 if dtype == torch.float32 else 2 ** -8
    error = (logits.grad.double() - reference.grad.double()).abs().max() / reference.grad.abs().max()
    assert error <= tolerance, error
    assert torch.all(logits.grad[:, -1] == 0)                      # no target after the last token


def test_chunked_token_nll_scales_its_gradient_and_skips_ignored_rows():
    """The incoming gradient scales each row's softmax - onehot; rows without a target (-100) get zero."""
    from lowbit.objectives.base import ChunkedTokenNLL
    torch.manual_seed(1)
    logits = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([3, -100, 0, 10, -100, 5, 2])
    (2.5 * ChunkedTokenNLL.apply(logits, targets, 3)).backward()
    expected = torch.softmax(logits.detach(), dim=-1)
    expected[torch.arange(7), targets.clamp(min=0)] -= 1
    expected[targets == -100] = 0
    torch.testing.assert_close(logits.grad, 2.5 * expected, rtol=1e-6, atol=1e-12)
