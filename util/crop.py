"""RandomResizedCrop with the TF / BYOL-style parameter draw, used by the linear probe.

torchvision's RandomResizedCrop retries up to 10 draws until the crop fits inside the image and
falls back to a centre crop. The variant here draws area and aspect ratio once and clamps the
crop's width and height to the image, as the original MAE linear-probe code does.
"""
import math

import torch
from torchvision import transforms
from torchvision.transforms import functional as F


class RandomResizedCrop(transforms.RandomResizedCrop):
    """torchvision's RandomResizedCrop with a single, clamped draw of the crop box."""

    @staticmethod
    def get_params(img, scale, ratio):
        """Return (i, j, h, w): top, left, height, width of a random crop inside img.

        Same random draws, in the same order, as torchvision's first attempt: area fraction
        ~ U(scale), log aspect ratio ~ U(log ratio), then top and left uniform over the valid
        positions. w and h are clamped to the image instead of redrawn.
        """
        _, height, width = F.get_dimensions(img)
        area = height * width

        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        log_ratio = torch.log(torch.tensor(ratio))
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()

        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        w = min(max(w, 1), width)  # clamp, no retry (at least one pixel for tiny images)
        h = min(max(h, 1), height)

        i = torch.randint(0, height - h + 1, size=(1,)).item()
        j = torch.randint(0, width - w + 1, size=(1,)).item()
        return i, j, h, w
