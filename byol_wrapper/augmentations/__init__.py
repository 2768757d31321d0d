"""Per-sample GPU augmentations for BYOL, after Grill et al. 2020 (arXiv:2006.07733).

BYOL builds two *asymmetric* views of every image (paper, Section 3.3 and Appendix B, Table 6). Both views
apply, in this order:

1. a random resized crop, scale ``(0.08, 1.0)``, aspect ratio ``(3/4, 4/3)``, resized to the output size
   with bicubic interpolation;
2. a random horizontal flip, ``p = 0.5``;
3. colour jitter with ``p = 0.8``: brightness ``0.4``, contrast ``0.4``, saturation ``0.2``, hue ``0.1``,
   the four operations applied in a random order;
4. a conversion to grayscale, ``p = 0.2``;
5. a Gaussian blur, kernel 23x23 at 224 px (about 10% of the side), sigma uniform in ``(0.1, 2.0)``;
   ``p = 1.0`` for view 1 and ``p = 0.1`` for view 2;
6. solarization ``x -> 1 - x`` where ``x >= 0.5``; ``p = 0.0`` for view 1 and ``p = 0.2`` for view 2;

followed by a clamp to ``[0, 1]`` and a per-channel normalization (ImageNet statistics by default).

Every random quantity is drawn independently for each image of the batch -- the crop, the flip, whether and
how the colours are jittered (including the order of the four jitter operations), grayscale, the blur and its
sigma, and solarization -- with torch's global random number generator on the input's device (one
``torch.rand`` call per forward pass). The whole batch is transformed with batched tensor operations: there
is no Python loop over samples, no host-device synchronization and no host-to-device copy on the hot path,
so the views run at full speed on a GPU. On the CPU (in eager mode) the batch goes through in slices of about
a million output values, e.g. 6 images at 224 px: the same result bit for bit, but the intermediate tensors
stay small enough for the memory allocator to reuse, which makes 224 px views faster there (figures in
benchmarks/RESULTS.md).

Layout (one concept per file; parameter generation apart from application, as in kornia):

- ``params.py``: :class:`~byol_wrapper.augmentations.params.ViewParams`, the named per-sample random draws of one
  forward pass (one ``torch.rand`` call);
- ``geometric.py``: the batched per-sample crop boxes and the crop + resize + flip resampling;
- ``intensity.py``: the batched per-sample colour jitter, hue, grayscale, blur and solarization, and
  :func:`blur_kernel_size`;
- ``images.py``: which tensors are images, :func:`to_float_image`;
- ``normalize.py``: the normalization statistics (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`, the defaults per
  channel count);
- ``views.py``: :class:`BYOLView` and :func:`byol_views`.

Implementation notes. Kornia supplies the image operations: :func:`kornia.color.rgb_to_grayscale`,
:func:`kornia.filters.get_gaussian_kernel1d` (one kernel per sample) and
:func:`kornia.filters.filter2d_separable` (a grouped depthwise convolution, so each sample is blurred with its
own sigma). The hue shift is :func:`kornia.enhance.adjust_hue`'s HSV rotation in a closed form that needs fewer
passes over the image (see :func:`~byol_wrapper.augmentations.intensity.hue`; tested equal to kornia's). The random parameters are drawn here rather
than by ``kornia.augmentation`` modules, because those draw on the module's RNG device (the CPU unless the module
was moved) and copy the parameters to the input's device, ``ColorJitter`` draws one order of its four ops per
batch rather than per sample, ``RandomSolarize`` also randomizes the threshold and adds a random brightness
shift, and ``gaussian_blur2d`` reads a tensor ``sigma`` back to the host to validate it. The crop and the flip are one
``grid_sample`` pass; brightness, contrast and saturation use the formulas of kornia's
``adjust_brightness_accumulative``, ``adjust_contrast_with_mean_subtraction`` and
``adjust_saturation_with_gray_subtraction`` (torchvision's), fused so that each sample's own order costs a
few cheap passes over the batch (see :func:`~byol_wrapper.augmentations.intensity.color_jitter`).

Example:
    >>> view1, view2 = byol_views(32)
    >>> images = torch.rand(8, 3, 40, 40)
    >>> one, two = view1(images), view2(images)
    >>> one.shape, one.dtype
    (torch.Size([8, 3, 32, 32]), torch.float32)
"""

from .images import to_float_image
from .intensity import blur_kernel_size
from .normalize import IMAGENET_MEAN, IMAGENET_STD
from .views import BYOLView, byol_views

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BYOLView",
    "blur_kernel_size",
    "byol_views",
    "to_float_image",
]
