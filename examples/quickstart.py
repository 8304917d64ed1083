"""Quickstart: optimize a small 3-D decoder, print the rewrite report, check results and checkpoints.

Runs on the CPU (reference path) and, when there is one, on CUDA (the fused kernel):

    python examples/quickstart.py
"""
import io

import torch
import torch.nn as nn

import ct3d_fx


class Decoder(nn.Module):
    """Two up-sampling stages (ConvTranspose3d -> BatchNorm3d -> ReLU), a residual add, a head."""

    def __init__(self, c_in=32, c_mid=16, c_out=4):
        super().__init__()
        self.up1 = nn.Sequential(
            nn.ConvTranspose3d(c_in, c_mid, 3, stride=2, padding=1, output_padding=1),
            nn.BatchNorm3d(c_mid), nn.ReLU(inplace=True))
        self.up2 = nn.Sequential(
            nn.ConvTranspose3d(c_mid, c_mid, 3, stride=1, padding=1),
            nn.BatchNorm3d(c_mid), nn.ReLU())
        self.head = nn.ConvTranspose3d(c_mid, c_out, 2, stride=2)

    def forward(self, x):
        y = self.up1(x)
        y = self.up2(y) + y          # residual add: fused into the up2 site
        return self.head(y)


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = Decoder().to(device).eval()
    for bn in (model.up1[1], model.up2[1]):     # non-trivial running statistics
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 32, 8, 12, 12, device=device)

    opt = ct3d_fx.optimize(model, (x,))
    print(opt.ct3d_report)

    with torch.no_grad():
        ref, out = model(x), opt(x)
    err = ((out - ref).norm() / ref.norm()).item()
    print(f"\nrelative L2 error optimized vs original: {err:.2e} on {device}")
    assert err < (1e-2 if device == "cuda" else 1e-5), err

    # Parameters are shared: a checkpoint of either model loads into the other (strict=True).
    assert opt.get_parameter("up1.0.weight") is model.up1[0].weight
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = Decoder().to(device).eval()
    fresh.load_state_dict(torch.load(buf), strict=True)
    opt.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(fresh(x), ref, rtol=1e-4, atol=1e-5)
    print("checkpoints: optimized -> original class and original -> optimized load with strict=True")


if __name__ == "__main__":
    main()
