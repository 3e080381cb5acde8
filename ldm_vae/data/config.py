"""`data:`: where images come from and how they are prepared (read by data/sources.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import FieldError, non_negative, one_of, positive, unit_interval, unused

SOURCES = ("fashion-mnist", "imagefolder", "hub", "photos", "wallpapers")
# The keys each source reads, beyond those every source reads (resolution, splits, flips,
# max_images, num_workers). A key outside its source's list must keep its default.
SOURCE_KEYS = {
    "fashion-mnist": ("path",),
    "imagefolder": ("path", "image_column", "label_column", "caption_column", "center_crop", "max_bad_fraction",
                    "decoded_cache_mb", "streaming", "shuffle_buffer"),
    "hub": ("name", "image_column", "label_column", "caption_column", "center_crop", "max_bad_fraction",
            "decoded_cache_mb", "streaming", "shuffle_buffer"),
    "photos": ("photos_per_epoch",),
    "wallpapers": ("photos_per_epoch", "wallpaper_art", "max_side"),
}


@dataclass
class DataConfig:
    # fashion-mnist | imagefolder | hub | photos | wallpapers (see ldm_vae/data/sources.py).
    # wallpapers: the photographs among Debian's plasma-workspace-wallpapers, mate-backgrounds
    # and lomiri-wallpapers-16.04 plus scikit-image's photos; its test split is 5 whole images
    # held out
    source: str = "fashion-mnist"
    # fashion-mnist: folder with the idx .gz files; imagefolder: the image folder root
    path: Optional[str] = None
    # hub: the dataset name on the Hugging Face hub (needs internet)
    name: Optional[str] = None
    # imagefolder/hub: the columns holding images and integer labels
    image_column: str = "image"
    label_column: Optional[str] = "label"
    # imagefolder/hub: the column holding each image's caption (text-to-image training); an
    # image folder gets its columns from a metadata.jsonl next to the images (`file_name` plus
    # e.g. `text`). Items then carry "caption" and `ldm-vae encode` stores the captions with the
    # latents. null: no captions
    caption_column: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    resolution: int = 32
    # imagefolder/hub training: true resizes the short side and centre-crops; false takes a
    # random crop of the resized image (evaluation always centre-crops)
    center_crop: bool = True
    random_flip: bool = True
    # use only the first N images of each split (tiny smoke runs); null: all
    max_images: Optional[int] = None
    # imagefolder/hub: files that cannot be decoded are skipped and listed; above this share
    # of the split, stop before training
    max_bad_fraction: float = 0.05
    # photos/wallpapers: how many random crops make one epoch
    photos_per_epoch: int = 2048
    # wallpapers: also train on the rendered and painted wallpapers (Plasma's art and
    # gnome-backgrounds); the test split stays the held-out photographs
    wallpaper_art: bool = False
    # wallpapers: each image is decoded once per process and kept with its longer side at
    # most this; crops come from that copy, so this sets the finest scale a crop sees
    max_side: int = 1024
    # DataLoader workers of training, and of an imagefolder/hub split's first scan (from 128 rows on)
    num_workers: int = 0
    # imagefolder/hub: keep each file's decoded, resized image in memory, filled when the
    # dataset is built (every file is decoded then anyway, to find bad ones), up to this many
    # MB per process; later accesses only crop and flip. 0: decode on every access
    decoded_cache_mb: int = 2048
    # imagefolder/hub, train-vae only: read the training split as a stream (datasets'
    # streaming=True): no download or scan up front, unusable files skipped and counted as they
    # are read, data.max_bad_fraction checked on the rows read so far (from 1000 rows on).
    # Every other command reads images by index and needs false
    streaming: bool = False
    # streaming training: rows held in the shuffle buffer (datasets' IterableDataset.shuffle;
    # each holds the file's bytes, so memory grows with it)
    shuffle_buffer: int = 1000

    def __post_init__(self):
        one_of(self, "source", SOURCES)
        positive(self, "resolution", "photos_per_epoch", "max_images", "max_side", "shuffle_buffer")
        non_negative(self, "num_workers", "decoded_cache_mb")
        unit_interval(self, "max_bad_fraction")
        own = SOURCE_KEYS[self.source]
        unused(self, [k for keys in SOURCE_KEYS.values() for k in keys if k not in own],
               f"data.source '{self.source}'")
        if self.source == "imagefolder" and not self.path:
            raise FieldError("path", "is needed by data.source 'imagefolder' (the image folder)")
        if self.source == "wallpapers" and self.max_side < self.resolution:
            raise FieldError("max_side", f"must be at least data.resolution ({self.resolution}): crops would be "
                                         f"upsampled")
        if self.streaming:
            unused(self, ["decoded_cache_mb"], "data.streaming (a stream keeps no decoded images)")
        else:
            unused(self, ["shuffle_buffer"], "a split that is not streamed (data.streaming=false)")
        if self.source == "hub" and not self.name:
            raise FieldError("name", "is needed by data.source 'hub' (a dataset name on the hub)")
