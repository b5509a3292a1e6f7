"""The cosine vector quantiser of VQ-BEGAL (eq. 2-3)."""

import torch
import torch.nn.functional as F

from VQMedSegLib.models.quantizers import CosineVectorQuantizer


def test_assignment_is_argmax_cosine_similarity():
    torch.manual_seed(0)
    vq = CosineVectorQuantizer(num_codes=37, dim=8).eval()
    with torch.no_grad():
        vq.codebook.mul_(torch.rand(37, 1) * 5 + 0.1)  # codeword norms must not matter
    z = torch.randn(3, 8, 5, 4) * torch.rand(3, 1, 5, 4) * 10  # neither must feature norms
    out = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    cos = F.cosine_similarity(flat[:, None, :], vq.codebook[None], dim=2)
    assert torch.equal(out.indices.flatten(), cos.argmax(1))
    expected = F.normalize(vq.codebook, dim=1)[cos.argmax(1)]
    torch.testing.assert_close(out.quantized.permute(0, 2, 3, 1).reshape(-1, 8), expected)


def test_straight_through_gradients_reach_features_and_codebook():
    torch.manual_seed(1)
    vq = CosineVectorQuantizer(num_codes=16, dim=4, dead_threshold=0)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z)
    (out.quantized * torch.randn_like(out.quantized)).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # STE: decoder gradient reaches the encoder
    assert vq.codebook.grad is None or vq.codebook.grad.abs().sum() == 0  # ...but not the codebook
    vq.zero_grad()
    z2 = torch.randn(2, 4, 3, 3, requires_grad=True)
    out2 = vq(z2)
    (out2.codebook_loss + out2.commitment_loss).backward()
    assert vq.codebook.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


def test_utilisation_perplexity_and_dead_code_revival():
    torch.manual_seed(2)
    vq = CosineVectorQuantizer(num_codes=64, dim=8, dead_threshold=0.5, usage_decay=0.5)
    # every feature points the same way: one code gets everything
    z = torch.ones(4, 8, 4, 4)
    out = vq.eval()(z)
    assert out.utilisation.item() == 1 / 64
    assert abs(out.perplexity.item() - 1.0) < 1e-4
    vq.train()
    for _ in range(5):
        vq(torch.randn(4, 8, 4, 4) + 3)
    assert vq.revived_total.item() > 0
    # revived codes sit on current features, so they are used again
    out = vq.eval()(torch.randn(4, 8, 4, 4) + 3)
    assert out.utilisation.item() > 1 / 64
