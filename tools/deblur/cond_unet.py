"""PyTorch reference modules of the deblurring models (issue 18) as the engine builds them:

  ImageConditionedUNet  the icDPM's network: a UNet2DModel whose input is the noisy image x
                        concatenated with the blurry one along the channels, so conv_in reads
                        in_channels = C + C_cond; config.json carries our key
                        "_cond_channels": C_cond (diffusers ignores "_" keys and loads the
                        same folder as a plain UNet2DModel with in_channels C + C_cond).
  RegressionUNet        the regression baseline: a plain UNet2DModel mapping the blurry image
                        at timestep 0 straight to the sharp one.
  GuidedUNet            the icDPM with multiscale structure guidance (Ren et al., ICCV 2023;
                        our layout, config keys "_guide_scales" and "_guide_channels"): per
                        scale s a guide network reads the blurry image's grayscale average-
                        pooled by 2^s (conv_in 1 -> F, a ResnetBlock2D without time embedding);
                        its features enter every resnet of down_blocks.s through a 1x1
                        projection (guide_proj, no bias) added to that resnet's conv1 output,
                        and its head (conv_out F -> 1, plus the pooled input) predicts the
                        sharp image's grayscale at that scale for the auxiliary loss.

Both wrap tools/torch_unet.py's UNet2D (diffusers' parameter names, diffusers v0.21 forward),
so a state_dict is the engine's safetensors file.

    from cond_unet import ImageConditionedUNet, write_model_dir
    net = ImageConditionedUNet(config, seed=0)        # config includes _cond_channels
    eps = net(x_t, blurry, timesteps)
    write_model_dir(path, net.config, net)
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

TOOLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TOOLS)
import st  # noqa: E402
from torch_unet import UNet2D  # noqa: E402
from unet_arch import full_config  # noqa: E402


def _check(config):
    cc = int(config.get("_cond_channels", 0))
    cin = int(config.get("in_channels", 3))
    if not 0 <= cc < cin:
        raise ValueError("_cond_channels %d must be in [0, in_channels %d)" % (cc, cin))
    return cc


class ImageConditionedUNet(torch.nn.Module):
    def __init__(self, config, weights=None, seed=0):
        super().__init__()
        self.cond_channels = _check(config)
        if self.cond_channels == 0:
            raise ValueError("an image-conditioned UNet needs _cond_channels > 0")
        self.config = dict(config)
        self.unet = UNet2D(config, weights=weights, seed=seed)

    def forward(self, x, cond, timesteps, class_labels=None):
        if cond.shape[1] != self.cond_channels or cond.shape[2:] != x.shape[2:]:
            raise ValueError("cond %s does not fit x %s" % (tuple(cond.shape), tuple(x.shape)))
        return self.unet(torch.cat([x, cond], dim=1), timesteps, class_labels)


class RegressionUNet(torch.nn.Module):
    def __init__(self, config, weights=None, seed=0):
        super().__init__()
        if _check(config):
            raise ValueError("a regression UNet reads the blurry image as x: no _cond_channels")
        self.config = dict(config)
        self.unet = UNet2D(config, weights=weights, seed=seed)

    def forward(self, blurry):
        t = torch.zeros(blurry.shape[0], dtype=blurry.dtype)
        return self.unet(blurry, t)


LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as the engine's unet_guide_input


def guide_input(img, scale):
    """The grayscale of img [n, 1 or 3, h, w] averaged over 2^scale x 2^scale blocks."""
    g = img[:, :1] if img.shape[1] == 1 else (
        LUMA[0] * img[:, 0:1] + LUMA[1] * img[:, 1:2] + LUMA[2] * img[:, 2:3])
    return F.avg_pool2d(g, 2 ** scale) if scale else g


class _GuideNet(torch.nn.Module):
    """guide.{s}: conv_in (1 -> F), resnet (diffusers' ResnetBlock2D names, no time embedding),
    conv_out (F -> 1)."""

    def __init__(self, width, groups, eps):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.conv_in = torch.nn.Conv2d(1, width, 3, padding=1)
        self.resnet = torch.nn.Module()
        self.resnet.norm1 = torch.nn.GroupNorm(groups, width, eps=eps)
        self.resnet.conv1 = torch.nn.Conv2d(width, width, 3, padding=1)
        self.resnet.norm2 = torch.nn.GroupNorm(groups, width, eps=eps)
        self.resnet.conv2 = torch.nn.Conv2d(width, width, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, gray):
        r = self.resnet
        x = self.conv_in(gray)
        h = r.conv1(F.silu(r.norm1(x)))
        h = r.conv2(F.silu(r.norm2(h)))
        feat = x + h
        return feat, self.conv_out(feat) + gray


class GuidedUNet(torch.nn.Module):
    def __init__(self, config, weights=None, seed=0):
        super().__init__()
        self.cond_channels = _check(config)
        self.scales = [int(s) for s in config.get("_guide_scales", [])]
        cx = int(config.get("in_channels", 3)) - self.cond_channels
        if not self.scales or self.cond_channels not in (1, 3) or cx != self.cond_channels:
            raise ValueError("a guided UNet needs _guide_scales and _cond_channels 1 or 3 equal "
                             "to the denoised image's channels")
        self.config = dict(config)
        width = int(config.get("_guide_channels", 16))
        full = full_config(config)
        groups, eps = int(full.get("norm_num_groups", 32)), float(full.get("norm_eps", 1e-5))
        ch = list(full["block_out_channels"])
        self.layers = int(full.get("layers_per_block", 2))
        unet_w = None
        if weights is not None:
            unet_w = {k: v for k, v in weights.items()
                      if not k.startswith("guide.") and ".guide_proj." not in k}
        self.unet = UNet2D(config, weights=unet_w, seed=seed)
        self.guide = torch.nn.ModuleDict(
            {str(s): _GuideNet(width, groups, eps) for s in self.scales})
        self.proj = torch.nn.ParameterDict()
        g = torch.Generator().manual_seed(int(seed) + 1)
        for s in self.scales:
            for l in range(self.layers):
                bound = 1.0 / width ** 0.5
                w = (torch.rand(ch[s], width, 1, 1, generator=g) * 2 - 1) * bound
                self.proj["%d_%d" % (s, l)] = torch.nn.Parameter(w)
        if weights is not None:
            own = self.named_weights()
            for k, p in own.items():
                v = weights[k]
                v = v if torch.is_tensor(v) else torch.from_numpy(v)
                with torch.no_grad():
                    p.copy_(v.to(p.dtype))

    def named_weights(self):
        """The guidance tensors under the engine's names."""
        out = {"guide." + k: v for k, v in self.guide.named_parameters()}
        for s in self.scales:
            for l in range(self.layers):
                out["down_blocks.%d.resnets.%d.guide_proj.weight" % (s, l)] = self.proj["%d_%d" % (s, l)]
        return out

    def state_weights(self):
        w = dict(self.unet.state_dict())
        w.update(self.named_weights())
        return w

    def forward(self, x, cond, timesteps, class_labels=None):
        """The model output and {scale: the guide head's prediction of the sharp grayscale}."""
        preds, guide = {}, {}
        for s in self.scales:
            feat, preds[s] = self.guide[str(s)](guide_input(cond, s))
            guide[s] = [F.conv2d(feat, self.proj["%d_%d" % (s, l)]) for l in range(self.layers)]
        out = self.unet(torch.cat([x, cond], dim=1), timesteps, class_labels, guide=guide)
        return out, preds

    def guide_loss(self, preds, sharp, weight):
        """weight * sum over scales of the MSE to the sharp image's pooled grayscale."""
        return weight * sum(((preds[s] - guide_input(sharp, s)) ** 2).mean() for s in self.scales)


def write_model_dir(path, config, net, dtype="F32"):
    """config.json (diffusers' UNet2DModel keys plus our "_" keys) and the safetensors file."""
    os.makedirs(path, exist_ok=True)
    cfg = full_config(config)
    cfg.update({k: v for k, v in config.items() if k.startswith("_") and k != "_class_name"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(sorted(cfg.items())), f, indent=2)
        f.write("\n")
    state = net.state_weights() if hasattr(net, "state_weights") else net.unet.state_dict()
    weights = {k: v.detach().float().numpy() for k, v in state.items()}
    st.save(os.path.join(path, "diffusion_pytorch_model.safetensors"), weights, dtype=dtype,
            metadata={"format": "pt"})
