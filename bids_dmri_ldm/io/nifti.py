"""NIfTI streaming, fast gzip and atomic writes (numpy + nibabel headers; no BIDS, no nipype).

Every image the pipeline writes goes through :func:`save_nifti` (a whole image) or
:func:`write_nifti_volumes` (a 4D image streamed volume by volume); the large inputs are read
through :func:`read_nifti_volumes` / :func:`iter_nifti_volumes`. Headers and voxel bytes are
nibabel's (``Nifti1Header``, Fortran order); only the gzip layer and the streaming are ours.

Why not nibabel's own ``.nii.gz`` I/O for the large images: nibabel deflates and inflates with the
standard library's zlib. Measured on the HCP-size 7T-like output (173 x 207 x 173 x 108 int16,
1.34 GB raw) on the project's 2-core VM: zlib level 1 takes 14 s CPU to write it and 5 s to read
it; ISA-L (python-isal, PSF-2.0, on ISA-L's BSD-3 code) 1.9 s and 3.0 s, with a 2.6 % larger file.
ISA-L writes the ordinary DEFLATE/gzip format (RFC 1952): nibabel, FSL, AFNI and the BIDS
validator read the files as before. The gzip header has no file name and mtime 0 (as
``gzip.GzipFile(filename="", mtime=0)`` writes it): reproducible bytes and no validator
``GZIP_HEADER_*`` warning.

Writes are atomic (:func:`~.files.atomic_path`): a temporary file in the target's folder, renamed
onto the target only when complete (``os.replace``), mode 0644.
"""
from __future__ import annotations

import gzip
import io
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np
from isal import igzip, igzip_threaded, isal_zlib

from .files import atomic_path

#: gzip level of the images written (ISA-L levels 0-3). Level 1 (as nibabel's default zlib level)
#: is the speed/size trade-off: level 2 made the HCP-size int16 output 0.3 % smaller at the same
#: speed, level 3 is several times slower.
GZIP_LEVEL = 1

#: Compression threads of a gzip stream written by :func:`open_nifti_write`. The compression
#: runs beside the caller (python-isal releases the GIL), so the next volume is computed while the
#: previous ones are deflated. Two threads: the rebuild step at HCP size (1.34 GB of int16 output)
#: took 4.95 s against 5.8 s with one (median of 6 alternating runs each, 2-core VM, 2026-12-01),
#: where its computing otherwise waited for a single deflating thread.
GZIP_THREADS = 2

#: Errors that a truncated or corrupt ``.nii.gz`` raises while it is read (nibabel, zlib, ISA-L).
READ_ERRORS = (OSError, EOFError, zlib.error, isal_zlib.error, gzip.BadGzipFile,
               nib.filebasedimages.ImageFileError, ValueError)


def is_gzip_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a gzip-compressed file (``.gz`` suffix, as nibabel decides)."""
    return str(path).endswith(".gz")


# ---------------------------------------------------------------------------------------------
# atomic, gzip-aware output streams


def gzip_writer(raw: BinaryIO, compresslevel: int = GZIP_LEVEL, threads: int = GZIP_THREADS) -> BinaryIO:
    """A gzip stream (ISA-L) over the binary file ``raw``; closing it does not close ``raw``.

    The gzip header has no file name and mtime 0 (python-isal's threaded writer writes it so).
    """
    return igzip_threaded.open(raw, "wb", compresslevel=compresslevel, threads=max(1, int(threads)))


@contextmanager
def open_nifti_write(path: str | os.PathLike, compresslevel: int = GZIP_LEVEL,
                     threads: int = GZIP_THREADS) -> Iterator[BinaryIO]:
    """Binary stream that becomes ``path`` atomically when the block ends without error:
    gzip-compressed (:func:`gzip_writer`) for ``.gz`` paths, plain otherwise."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        if is_gzip_path(path):
            with gzip_writer(raw, compresslevel, threads) as stream:
                yield stream
        else:
            yield raw


class _PositionedWriter(io.RawIOBase):
    """A write-only stream that knows its position, so nibabel's ``to_file_map`` (which asks
    ``seek``/``tell`` to reach the data offset) can write into a gzip stream that cannot seek."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self._pos = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        written = self._stream.write(data)
        n = memoryview(data).nbytes if written is None else written
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self._pos + offset if whence == io.SEEK_CUR else None
        if target != self._pos:
            raise OSError("this stream cannot seek")  # nibabel then pads with zeros via write
        return self._pos


def save_nifti(img: nib.Nifti1Image, path: str | os.PathLike, compresslevel: int = GZIP_LEVEL,
               threads: int = GZIP_THREADS) -> Path:
    """Save a NIfTI image atomically; ``.nii.gz`` through ISA-L gzip, ``.nii`` uncompressed.

    The uncompressed bytes are exactly those of ``nibabel.save`` (nibabel writes the header and
    the array into the stream); only the compressor differs.
    """
    path = Path(path)
    with open_nifti_write(path, compresslevel, threads) as stream:
        target = _PositionedWriter(stream)
        holder = nib.FileHolder(fileobj=target)
        img.to_file_map({"image": holder, "header": holder})
    return path


def write_nifti_volumes(path: str | os.PathLike, shape: tuple[int, ...], affine: np.ndarray, n_volumes: int,
                        volumes: Iterable[np.ndarray], dtype=np.float32, compresslevel: int = GZIP_LEVEL,
                        slope: float | None = None, threads: int = GZIP_THREADS) -> Path:
    """Stream 3D volumes into a 4D NIfTI-1 file, atomically.

    The header has mm/s units and the affine as qform and sform (code 1); each volume is written
    in NIfTI (Fortran) order as it is produced, so memory holds one volume. ``.nii.gz`` paths
    are gzip-compressed (ISA-L, :data:`GZIP_LEVEL`).

    Parameters
    ----------
    path : path-like
        ``.nii`` or ``.nii.gz``.
    shape : tuple of 3 ints
    affine : ndarray, shape (4, 4)
    n_volumes : int
        Number of volumes ``volumes`` yields (checked).
    volumes : iterable of ndarray, each ``shape``
        Image values; with an integer ``dtype``, volumes already of that type are taken as the
        stored (quantised) values and written as they are.
    dtype : numpy dtype
        On-disk type (float32, or an integer type with ``slope``).
    slope : float, optional
        ``scl_slope`` for an integer ``dtype``: stored = round(value / slope), clipped to the
        type's range (intercept 0).
    """
    path = Path(path)
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(tuple(int(n) for n in shape[:3]) + (int(n_volumes),))
    header.set_xyzt_units("mm", "sec")
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_data_offset(352)  # 348-byte header + 4-byte "no extension" flag
    integer = np.issubdtype(np.dtype(dtype), np.integer)
    if integer:
        if slope is None or not slope > 0:
            raise ValueError("an integer on-disk type needs a positive slope")
        header.set_slope_inter(float(slope), 0.0)
        limits = np.iinfo(dtype)
    written = 0
    with open_nifti_write(path, compresslevel, threads) as handle:
        header.write_to(handle)
        for volume in volumes:
            if np.shape(volume) != tuple(shape[:3]):
                raise ValueError(f"volume of shape {np.shape(volume)} for an image of shape {tuple(shape[:3])}")
            flat = np.asarray(volume).ravel(order="F")  # NIfTI order; a view when already Fortran-ordered
            if integer and flat.dtype != np.dtype(dtype):  # stored values as they are
                flat = _quantise(flat, float(slope), np.dtype(dtype), limits)
            handle.write(memoryview(np.ascontiguousarray(flat, dtype=dtype)).cast("B"))
            written += 1
        if written != n_volumes:
            raise ValueError(f"{written} volumes written, {n_volumes} announced")
    return path


def _quantise(values: np.ndarray, slope: float, dtype: np.dtype, limits: np.iinfo) -> np.ndarray:
    """``clip(rint(values / slope))`` as ``dtype`` (round half to even, as ``np.rint``), in torch:
    one multi-threaded pass instead of numpy's four (same float32 division, same values)."""
    import torch  # imported here: the I/O module itself does not need torch

    x = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    q = torch.div(x, np.float32(slope)).round_().clamp_(limits.min, limits.max)
    return q.numpy().astype(dtype)  # numpy's cast of the (integral) values: ~2x faster than torch's


# ---------------------------------------------------------------------------------------------
# streamed reading


@dataclass(frozen=True)
class NiftiLayout:
    """Where and how the voxel values of a NIfTI file are stored (from its header)."""

    shape: tuple[int, int, int]
    n_volumes: int
    dtype: np.dtype  # on-disk type, with its byte order
    offset: int  # bytes before the first voxel value
    slope: float
    inter: float
    affine: np.ndarray
    header: nib.Nifti1Header

    @property
    def scaled(self) -> bool:
        """Whether the stored values need ``slope``/``inter`` to become image values."""
        return self.slope != 1.0 or self.inter != 0.0


def nifti_layout(path: str | os.PathLike) -> NiftiLayout:
    """The header-only description of a NIfTI file (nibabel reads only the header).

    ``slope``/``inter`` are nibabel's interpretation (0 or NaN slope: no scaling).
    """
    img = nib.load(str(path))
    proxy = img.dataobj
    if getattr(proxy, "order", "F") != "F" or not hasattr(proxy, "offset"):
        raise ValueError(f"{Path(path).name}: not a NIfTI file with Fortran-ordered voxels")
    shape = tuple(int(n) for n in img.shape)
    spatial = (shape + (1, 1, 1))[:3]
    n_volumes = int(np.prod(shape[3:])) if len(shape) > 3 else 1
    slope = float(proxy.slope) if proxy.slope is not None and np.isfinite(proxy.slope) else 1.0
    inter = float(proxy.inter) if proxy.inter is not None and np.isfinite(proxy.inter) else 0.0
    return NiftiLayout(shape=spatial, n_volumes=n_volumes, dtype=np.dtype(proxy.dtype), offset=int(proxy.offset),
                       slope=slope, inter=inter, affine=np.asarray(img.affine, dtype=np.float64),
                       header=img.header)


@contextmanager
def open_nifti_read(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Binary stream of a NIfTI file's uncompressed bytes (ISA-L inflation for ``.gz``)."""
    if is_gzip_path(path):
        with igzip.open(str(path), "rb") as stream:
            yield stream
    else:
        with open(path, "rb") as stream:
            yield stream


def _read_exactly(stream: BinaryIO, buffer: memoryview) -> None:
    """Fill ``buffer`` from ``stream``; EOFError when the stream ends first (truncated file)."""
    filled = 0
    while filled < buffer.nbytes:
        n = stream.readinto(buffer[filled:])
        if not n:
            raise EOFError(f"file ends {buffer.nbytes - filled} bytes early (truncated)")
        filled += n


def iter_nifti_volumes(path: str | os.PathLike, layout: NiftiLayout | None = None
                       ) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(t, volume)`` for every volume of a 3D/4D NIfTI file, in file order.

    ``volume`` holds the stored (unscaled) values, on-disk type, shape ``layout.shape``
    (Fortran order). It is a view of one buffer that the next volume overwrites: copy or
    convert it before asking for the next. The whole file is read, to the end, so that a
    truncated or corrupt ``.gz`` raises (ISA-L checks the gzip CRC and length at the end).
    Memory: one volume.

    Raises
    ------
    EOFError, OSError, isal/zlib errors
        Truncated or corrupt file (see :data:`READ_ERRORS`).
    """
    layout = layout or nifti_layout(path)
    n_voxels = int(np.prod(layout.shape))
    buffer = np.empty(n_voxels, dtype=layout.dtype)
    raw = memoryview(buffer).cast("B")
    volume = buffer.reshape(layout.shape, order="F")
    with open_nifti_read(path) as stream:
        _read_exactly(stream, memoryview(bytearray(layout.offset)))  # header and extensions
        for t in range(layout.n_volumes):
            _read_exactly(stream, raw)
            yield t, volume
        stream.read()  # to the end: a gzip stream checks its CRC and length there


def read_nifti_volumes(path: str | os.PathLike, index: Sequence[int] | None = None, dtype=np.float32,
                       layout: NiftiLayout | None = None) -> tuple[np.ndarray, NiftiLayout]:
    """Volumes ``index`` (default: all) of a 3D/4D NIfTI file, ``(X, Y, Z, len(index))``.

    One pass over the file (:func:`iter_nifti_volumes`); each kept volume is converted into its
    slot of the result as it arrives (``value = stored * slope + inter`` in ``dtype`` for a float
    ``dtype``), so memory holds the result and one volume — never the whole stored series and
    a converted copy. An integer ``dtype`` keeps the stored values (only when the file has no
    scaling; ValueError otherwise).

    Returns
    -------
    data : ndarray, shape (X, Y, Z, len(index)), ``dtype``, Fortran order per volume
    layout : NiftiLayout
    """
    layout = layout or nifti_layout(path)
    index = list(range(layout.n_volumes)) if index is None else [int(i) for i in index]
    if any(not 0 <= i < layout.n_volumes for i in index):
        raise ValueError(f"volume index out of range 0..{layout.n_volumes - 1}: {index}")
    dtype = np.dtype(dtype)
    floating = np.issubdtype(dtype, np.floating)
    if not floating and layout.scaled:
        raise ValueError(f"{Path(path).name}: scaled values (slope {layout.slope}, intercept {layout.inter}) "
                         f"cannot be held as {dtype}")
    slots: dict[int, list[int]] = {}
    for slot, t in enumerate(index):
        slots.setdefault(t, []).append(slot)
    out = np.empty(layout.shape + (len(index),), dtype=dtype, order="F")
    for t, volume in iter_nifti_volumes(path, layout):
        for slot in slots.get(t, ()):
            target = out[..., slot]
            np.copyto(target, volume, casting="unsafe")
            if floating and layout.slope != 1.0:
                target *= dtype.type(layout.slope)
            if floating and layout.inter != 0.0:
                target += dtype.type(layout.inter)
    return out, layout


def load_nifti(path: str | os.PathLike) -> nib.Nifti1Image:
    """A NIfTI image with its voxel values in memory, read through :func:`read_nifti_volumes`
    (ISA-L for ``.gz``): the values of ``np.asanyarray(nib.load(path).dataobj)`` as float32
    when the file is scaled or floating point, else in the stored integer type."""
    layout = nifti_layout(path)
    keep_integer = np.issubdtype(layout.dtype, np.integer) and not layout.scaled
    data, _ = read_nifti_volumes(path, dtype=layout.dtype.newbyteorder("=") if keep_integer else np.float32,
                                 layout=layout)
    shape = tuple(int(n) for n in layout.header.get_data_shape())
    header = layout.header.copy()
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(np.nan, np.nan)
    return nib.Nifti1Image(data.reshape(shape, order="F"), layout.affine, header)


# ---------------------------------------------------------------------------------------------
# whole arrays and single channels (the pipeline's intermediate images)


def make_nifti(data: np.ndarray, affine: np.ndarray, dtype=np.float32) -> nib.Nifti1Image:
    """NIfTI-1 image with mm/s units and the affine as both qform and sform (code 1, scanner)."""
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def save_array(data: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype=np.float32) -> str:
    """Save an array as a NIfTI image (:func:`make_nifti`, :func:`save_nifti`); returns the path."""
    save_nifti(make_nifti(data, affine, dtype), path)
    return str(path)


def read_channel(img: nib.Nifti1Image, c: int) -> np.ndarray:
    """Channel ``c`` of a 3D/4D image as float32 ``(X, Y, Z)`` (a 3D image has one channel)."""
    data = img.dataobj if len(img.shape) == 3 else img.dataobj[..., c]
    return np.asarray(data, dtype=np.float32)


def read_channels_at(img: nib.Nifti1Image, voxels: np.ndarray) -> np.ndarray:
    """``(C, len(voxels))`` float32: the channels of a 3D/4D image at Fortran-order flat indices,
    read one channel at a time (an uncompressed ``.nii`` is memory-mapped); each row is
    contiguous. Every voxel of an uncompressed, unscaled float32 image: a read-only view of its
    memory map, no copy (the channels of a NIfTI file are its rows already)."""
    n_channels = 1 if len(img.shape) == 3 else int(img.shape[3])
    n_voxels = int(np.prod(img.shape[:3]))
    if voxels.size == n_voxels and _memory_mapped_float32(img):
        return np.asanyarray(img.dataobj).reshape((n_voxels, n_channels), order="F").T
    out = np.empty((n_channels, voxels.size), dtype=np.float32)
    data = img.dataobj
    for c in range(n_channels):
        volume = np.asanyarray(data if n_channels == 1 and len(img.shape) == 3 else data[..., c])
        flat = volume.ravel(order="F")
        out[c] = flat if voxels.size == flat.size else flat[voxels]  # all voxels: no gather
    return out


def _memory_mapped_float32(img: nib.Nifti1Image) -> bool:
    """Whether ``np.asanyarray(img.dataobj)`` is a float32 memory map of the file: an uncompressed
    ``.nii`` of unscaled float32 values (decided from the header, nothing read)."""
    filename = img.get_filename()
    proxy = img.dataobj
    return (bool(filename) and not is_gzip_path(filename) and img.get_data_dtype() == np.float32
            and getattr(proxy, "is_proxy", False) and float(proxy.slope) == 1.0 and float(proxy.inter) == 0.0)


def write_channels(values: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> str:
    """Stream a ``(X, Y, Z, C)`` array to a NIfTI file channel by channel (:func:`write_nifti_volumes`)."""
    shape = values.shape[:3]
    return str(write_nifti_volumes(path, shape, affine, values.shape[3],
                                   (values[..., c] for c in range(values.shape[3]))))


__all__ = [
    "GZIP_LEVEL",
    "GZIP_THREADS",
    "READ_ERRORS",
    "NiftiLayout",
    "atomic_path",
    "gzip_writer",
    "iter_nifti_volumes",
    "load_nifti",
    "make_nifti",
    "nifti_layout",
    "open_nifti_read",
    "open_nifti_write",
    "read_channel",
    "read_channels_at",
    "read_nifti_volumes",
    "save_array",
    "save_nifti",
    "write_channels",
    "write_nifti_volumes",
]
