"""DICOM header scanning, series grouping (as dcm2niix does) and pixel decoding: the public face.

The work lives in four modules along its jobs, and every name is re-exported here so callers keep
importing ``pipeline.ingest.dicom``:

* :mod:`pipeline.ingest.dicom_values`: tolerant tag-value parsing, public facts, private identifiers,
  functional-group lookups;
* :mod:`pipeline.ingest.dicom_header`: :func:`read_header` (no pixels), transfer-syntax and mosaic checks;
* :mod:`pipeline.ingest.dicom_series`: :func:`group_series` (dcm2niix-style grouping), :func:`item_key`;
* :mod:`pipeline.ingest.dicom_pixels`: :func:`decode_file` (pixels, modality LUT, mosaics, enhanced
  multi-frame) into :class:`Slice` s.

Two phases keep scanning fast:

* :func:`read_header` reads one file without its pixels (``stop_before_pixels``) and returns a picklable
  :class:`HeaderRecord` (or a :class:`~pipeline.ingest.sources.Rejected`-style ``(code, reason)``);
  :func:`group_series` splits the records into series/volumes.
* :func:`load_dicom_files` decodes the pixels of one group and hands the slices to
  :mod:`pipeline.ingest.dicom_geometry`, which sorts, checks and assembles them.

Tags used (keyword and number), so a reader can check the logic against the standard:

* grouping: StudyInstanceUID (0020,000D), SeriesInstanceUID (0020,000E), SeriesNumber (0020,0011),
  EchoNumbers (0018,0086), ImageType (0008,0008), ImageOrientationPatient (0020,0037), Rows (0028,0010),
  Columns (0028,0011). AcquisitionNumber (0020,0012) is *not* a split key (dcm2niix does not split on it
  by default: GE CT gives every slice its own number); it orders the volumes of a 4D series together with
  InstanceNumber (0020,0013) and TemporalPositionIdentifier (0020,0100).
* geometry: ImagePositionPatient (0020,0032), PixelSpacing (0028,0030), SliceThickness (0018,0050),
  SpacingBetweenSlices (0018,0088), GantryDetectorTilt (0018,1120); enhanced multi-frame files carry them
  in SharedFunctionalGroupsSequence (5200,9229) / PerFrameFunctionalGroupsSequence (5200,9230):
  PlanePositionSequence (0020,9113), PlaneOrientationSequence (0020,9116), PixelMeasuresSequence
  (0028,9110), PixelValueTransformationSequence (0028,9145), FrameContentSequence (0020,9111).
* pixels: BitsAllocated (0028,0100), BitsStored (0028,0101), PixelRepresentation (0028,0103),
  PhotometricInterpretation (0028,0004), RescaleSlope (0028,1053), RescaleIntercept (0028,1052),
  ModalityLUTSequence (0028,3000), NumberOfFrames (0028,0008), TransferSyntaxUID (0002,0010).
* Siemens mosaic: ImageType contains ``MOSAIC`` and the CSA image header (0029,1010) holds
  ``NumberOfImagesInMosaic`` and ``SliceNormalVector`` (parsed with :mod:`nibabel.nicom.csareader`).
* DICOMDIR: MediaStorageSOPClassUID (0002,0002) = 1.2.840.10008.1.3.10 (Media Storage Directory).
"""

from __future__ import annotations

from pipeline.ingest.dicom_header import (
    DICOMDIR_SOP_CLASS,
    HeaderRecord,
    image_type_key,
    mosaic_count,
    read_header,
)
from pipeline.ingest.dicom_pixels import Slice, decode_file
from pipeline.ingest.dicom_series import IOP_TOL, group_series, item_key
from pipeline.ingest.dicom_values import (
    REVIEW_MODALITIES,
    SC_SOP_PREFIX,
    parse_age,
    private_ids,
    public_facts,
)

__all__ = [
    "DICOMDIR_SOP_CLASS",
    "IOP_TOL",
    "REVIEW_MODALITIES",
    "SC_SOP_PREFIX",
    "HeaderRecord",
    "Slice",
    "decode_file",
    "group_series",
    "image_type_key",
    "item_key",
    "mosaic_count",
    "parse_age",
    "private_ids",
    "public_facts",
    "read_header",
]
