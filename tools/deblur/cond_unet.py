"""PyTorch reference modules of the deblurring models (issue 18) as the engine builds them:

  ImageConditionedUNet  the icDPM's network: a UNet2DModel whose input is the noisy image x
                        concatenated with the blurry one along the channels, so conv_in reads
                        in_channels = C + C_cond; config.json carries our key
                        "_cond_channels": C_cond (diffusers ignores "_" keys and loads the
                        same folder as a plain UNet2DModel with in_channels C + C_cond).
  RegressionUNet        the regression baseline: a plain UNet2DModel mapping the blurry image
                        at timestep 0 straight to the sharp one.

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


def write_model_dir(path, config, net, dtype="F32"):
    """config.json (diffusers' UNet2DModel keys plus our "_" keys) and the safetensors file."""
    os.makedirs(path, exist_ok=True)
    cfg = full_config(config)
    cfg.update({k: v for k, v in config.items() if k.startswith("_") and k != "_class_name"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(sorted(cfg.items())), f, indent=2)
        f.write("\n")
    weights = {k: v.detach().float().numpy() for k, v in net.unet.state_dict().items()}
    st.save(os.path.join(path, "diffusion_pytorch_model.safetensors"), weights, dtype=dtype,
            metadata={"format": "pt"})
