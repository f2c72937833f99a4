"""Detectron2's ``ROIAlign`` on a CPU as one product with a sparse matrix of its bilinear weights.

torchvision's CPU ``roi_align`` loops over RoIs, channels and sampling points one scalar at a
time, and its backward scatters every sample into the feature map on one thread: over 512 RoIs
of a 256-channel stride-4 level (1024 px images) 0.2 s forward and 0.6 s backward, 2 threads,
for what is 0.4 G multiply-adds each way. Yet RoIAlign is linear in the features: each output
cell is a fixed weighted sum of feature pixels (the bilinear weights of its sampling points,
averaged), the same for every channel. So with S the (R * ph * pw) x (B * H * W) sparse matrix
of those weights and X the features as (B * H * W) x C rows, the output is ``S @ X`` and the
gradient of the features ``S^T @ grad``: two multi-threaded sparse-dense products (MKL's where
PyTorch has it), 0.08 s and 0.13 s for the same work.

S is built with torchvision's CPU kernel's own rules (``roi_align_kernel.cpp``): the ``aligned``
half-pixel shift, the adaptive grid ``ceil(roi size / bins)`` when ``sampling_ratio`` is 0,
samples beyond one pixel outside the map dropped, coordinates clamped to the border, the count
floored at 1; outputs and gradients equal torchvision's up to float rounding
(tests/test_modeling_roi_align.py). It is computed in float32 (float64 for float64 input),
with the boxes in float32: Detectron2's ROIAlign casts the boxes to the features' dtype, which
under bfloat16 autocast rounds a coordinate near 1000 px to a multiple of 4 before torchvision
casts it back. Elsewhere (CUDA, quantised input, a matrix over ``MAX_ENTRIES`` entries)
Detectron2's ROIAlign runs as before.
"""

import warnings
from typing import Optional, Tuple, Union

import torch
from detectron2.layers import ROIAlign
from detectron2.modeling.poolers import ROIPooler
from torch import Tensor, nn

__all__ = ["SparseROIAlign", "roi_align_matrix", "use_sparse_roi_align"]

# Above this many weights (each an int64 row, int64 column and a float: 20 bytes) the matrix is
# not built and torchvision's kernel runs instead: 2^25 = 0.7 GB. Detectron2's level assignment
# keeps RoIs to a few sampling points per bin (512 nuclei RoIs: 0.2 M weights).
MAX_ENTRIES = 1 << 25


def _pair(size: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _axis_samples(v: Tensor, size: int):
    """torchvision's bilinear rules along one axis for sample coordinates ``v``: (inside,
    low index, high index, low weight, high weight)."""
    inside = (v >= -1.0) & (v <= size)  # False for NaN
    # Samples outside get weight 0; clamped first so that their indices stay in the map too.
    v = torch.where(inside, v, torch.zeros_like(v)).clamp(0, size)
    low = v.long()
    edge = low >= size - 1
    low = low.clamp_max(size - 1)
    high = torch.where(edge, low, low + 1)
    frac = torch.where(edge, torch.zeros_like(v), v - low.to(v.dtype))
    return inside, low, high, 1 - frac, frac


def _grid(extent: Tensor, bins: int, sampling_ratio: int) -> Tensor:
    if sampling_ratio > 0:
        return torch.full(extent.shape, sampling_ratio, dtype=torch.long)
    grid = torch.ceil(extent / bins)
    return torch.where(torch.isfinite(grid), grid, torch.zeros_like(grid)).clamp(0, 1 << 20).long()


def roi_align_matrix(
    rois: Tensor,
    input_shape: Tuple[int, int, int],
    output_size: Union[int, Tuple[int, int]],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    dtype: torch.dtype = torch.float32,
    max_entries: Optional[int] = None,
):
    """The sparse (R * ph * pw) x (B * H * W) COO matrix of RoIAlign's weights for ``rois``
    (R x 5: batch index, x0, y0, x1, y1) on a B x C x H x W input (``input_shape`` = (B, H, W)),
    or None if it would hold more than ``max_entries`` (default ``MAX_ENTRIES``) weights. Row
    r * ph * pw + i * pw + j is output cell (i, j) of RoI r; column b * H * W + y * W + x is
    pixel (y, x) of image b."""
    batch, height, width = input_shape
    ph, pw = _pair(output_size)
    r = rois.detach().to("cpu", dtype)
    offset = 0.5 if aligned else 0.0
    x0, y0 = r[:, 1] * spatial_scale - offset, r[:, 2] * spatial_scale - offset
    roi_w = r[:, 3] * spatial_scale - offset - x0
    roi_h = r[:, 4] * spatial_scale - offset - y0
    if not aligned:  # the legacy RoIAlign's minimum size of 1 pixel
        roi_w, roi_h = roi_w.clamp_min(1.0), roi_h.clamp_min(1.0)
    bin_w, bin_h = roi_w / pw, roi_h / ph
    grid_h, grid_w = _grid(roi_h, ph, sampling_ratio), _grid(roi_w, pw, sampling_ratio)
    count = (grid_h * grid_w).clamp_min(1).to(dtype)
    if int((grid_h * grid_w).sum()) * ph * pw * 4 > (max_entries or MAX_ENTRIES):
        return None
    image = r[:, 0].long()
    if len(image) and (int(image.min()) < 0 or int(image.max()) >= batch):
        raise ValueError(f"RoIAlign: a box's batch index is outside 0..{batch - 1}")
    cell_y = torch.arange(ph, dtype=dtype)
    cell_x = torch.arange(pw, dtype=dtype)
    rows, cols, vals = [], [], []
    # RoIs with the same sampling grid are computed together: gy x gx points per output cell.
    keys = grid_h * (1 << 21) + grid_w
    for key in keys.unique().tolist():
        gy, gx = key >> 21, key & ((1 << 21) - 1)
        if gy == 0 or gx == 0:
            continue  # no sampling point: the cell is 0, as in torchvision
        idx = (keys == key).nonzero()[:, 0]
        sub_y = (torch.arange(gy, dtype=dtype) + 0.5)[None, None, :]
        sub_x = (torch.arange(gx, dtype=dtype) + 0.5)[None, None, :]
        # n x ph x gy and n x pw x gx coordinates, in torchvision's order of operations
        bh, bw = bin_h[idx, None, None], bin_w[idx, None, None]
        ys = y0[idx, None, None] + cell_y[None, :, None] * bh + sub_y * bh / gy
        xs = x0[idx, None, None] + cell_x[None, :, None] * bw + sub_x * bw / gx
        in_y, y_lo, y_hi, wy_lo, wy_hi = _axis_samples(ys, height)
        in_x, x_lo, x_hi, wx_lo, wx_hi = _axis_samples(xs, width)
        # corners (lo, lo), (lo, hi), (hi, lo), (hi, hi): n x ph x gy x 1 x 1 x 4 by
        # n x 1 x 1 x pw x gx x 4
        yi = torch.stack([y_lo, y_lo, y_hi, y_hi], -1)[:, :, :, None, None]
        wy = torch.stack([wy_lo, wy_lo, wy_hi, wy_hi], -1)[:, :, :, None, None]
        xi = torch.stack([x_lo, x_hi, x_lo, x_hi], -1)[:, None, None]
        wx = torch.stack([wx_lo, wx_hi, wx_lo, wx_hi], -1)[:, None, None]
        inside = (in_y[:, :, :, None, None] & in_x[:, None, None])[..., None]
        n = len(idx)
        weight = wy * wx * inside / count[idx].view(n, 1, 1, 1, 1, 1)
        col = (image[idx] * (height * width)).view(n, 1, 1, 1, 1, 1) + yi * width + xi
        cell = (idx.view(n, 1, 1, 1, 1, 1) * ph + cell_y.long().view(1, ph, 1, 1, 1, 1)) * pw
        row = cell + cell_x.long().view(1, 1, 1, pw, 1, 1)
        rows.append(row.expand_as(col).reshape(-1))
        cols.append(col.reshape(-1))
        vals.append(weight.reshape(-1))
    shape = (len(r) * ph * pw, batch * height * width)
    if not rows:
        return torch.sparse_coo_tensor(
            torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, dtype=dtype), shape
        )
    index = torch.stack([torch.cat(rows), torch.cat(cols)])
    # Coalescing sums the weights of samples that share a pixel (clamped corners, close points).
    return torch.sparse_coo_tensor(index, torch.cat(vals), shape, check_invariants=False).coalesce()


def _csr(matrix: Tensor) -> Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return matrix.to_sparse_csr()


class _SparseProduct(torch.autograd.Function):
    """features (B x C x H x W) -> S @ features as rows; backward S^T @ grad."""

    @staticmethod
    def forward(ctx, features: Tensor, matrix: Tensor, compute_dtype: torch.dtype):
        b, c, h, w = features.shape
        rows = features.permute(0, 2, 3, 1).reshape(b * h * w, c).to(compute_dtype)
        ctx.matrix, ctx.shape, ctx.dtype = matrix, (b, c, h, w), features.dtype
        return _csr(matrix) @ rows  # (R * ph * pw) x C

    @staticmethod
    def backward(ctx, grad: Tensor):
        b, c, h, w = ctx.shape
        with torch.autocast(grad.device.type, enabled=False):
            g = _csr(ctx.matrix.t().coalesce()) @ grad.to(ctx.matrix.dtype).contiguous()
        g = g.view(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        return g.to(ctx.dtype), None, None


class SparseROIAlign(nn.Module):
    """Detectron2's ``ROIAlign`` (same arguments, same outputs up to float rounding) computed as a
    sparse matrix product on a CPU; Detectron2's own (torchvision's kernel) elsewhere."""

    def __init__(self, output_size, spatial_scale, sampling_ratio, aligned=True):
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.fallback = ROIAlign(output_size, spatial_scale, sampling_ratio, aligned)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        if rois.dim() != 2 or rois.size(1) != 5:
            raise ValueError(f"SparseROIAlign: rois must be R x 5, got {tuple(rois.shape)}")
        if input.device.type != "cpu" or input.is_quantized:
            return self.fallback(input, rois)
        ph, pw = self.output_size
        b, c, h, w = input.shape
        if len(rois) == 0:  # still part of the graph, as torchvision's
            return input.new_zeros(0, c, ph, pw) + input.reshape(-1)[:0].view(0, 1, 1, 1)
        dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        matrix = roi_align_matrix(
            rois, (b, h, w), self.output_size, self.spatial_scale, self.sampling_ratio,
            self.aligned, dtype,
        )  # fmt: skip
        if matrix is None:
            return self.fallback(input, rois)
        with torch.autocast("cpu", enabled=False):
            out = _SparseProduct.apply(input, matrix, dtype)
        out = out.view(len(rois), ph, pw, c).permute(0, 3, 1, 2).contiguous()
        return out.to(input.dtype)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )


def use_sparse_roi_align(pooler: ROIPooler) -> ROIPooler:
    """Replace the ``ROIAlign`` levels of a Detectron2 ``ROIPooler`` by ``SparseROIAlign`` (no
    parameters, so checkpoints do not change); other pooler types are left as they are."""
    for i, level in enumerate(pooler.level_poolers):
        if type(level) is ROIAlign:
            pooler.level_poolers[i] = SparseROIAlign(
                level.output_size, level.spatial_scale, level.sampling_ratio, level.aligned
            )
    return pooler
