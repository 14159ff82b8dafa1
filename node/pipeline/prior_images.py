"""Infer step, priors: the patient's earlier studies for a plugin whose manifest asks for them, fetched from
the configured PACS (node/pipeline/priors.py) into a cache folder and loaded like the current series.

Priors are never stored as received instances: the tracker and router never see them, so they are never
routed as new studies. A prior that cannot be found, fetched or loaded becomes a warning on the job; the
plugin then runs without it (it must not invent a comparison).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from pydicom import dcmread

from node.imaging import ImageLoadError, load_image
from node.logs import uid_hash
from node.pipeline.priors import PriorError, fetch_prior, find_priors
from node.settings import Settings
from plugins.base import Manifest, Prior

log = logging.getLogger("radnode.priors")


@dataclass
class Gathered:
    priors: list[Prior] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    used: list[dict[str, Any]] = field(default_factory=list)  # for findings.json / the job: UIDs and dates only


def _date(value: object) -> date | None:
    try:
        return datetime.strptime(str(value), "%Y%m%d").date() if value else None
    except ValueError:
        return None


def gather_priors(settings: Settings, manifest: Manifest, current: Path) -> Gathered:
    """The priors `manifest` asks for, for the study of the stored instance `current`. Raises nothing."""
    out = Gathered()
    spec = manifest.priors
    if spec is None:
        return out
    if settings.priors_source is None:  # the site has not set up a PACS to ask: the plugin runs without priors
        return out
    source = next(d for d in settings.destinations if d.name == settings.priors_source)
    try:
        ds = dcmread(current, stop_before_pixels=True,
                     specific_tags=["PatientID", "StudyDate", "StudyInstanceUID", "Modality"])
    except Exception as exc:  # noqa: BLE001 - any unreadable header only costs the comparison
        out.warnings.append(f"no comparison with prior studies: header unreadable ({type(exc).__name__})")
        return out
    patient_id, study_date = str(ds.get("PatientID") or "").strip(), _date(ds.get("StudyDate"))
    if not patient_id or study_date is None:
        out.warnings.append("no comparison with prior studies: the study has no PatientID or StudyDate")
        return out
    modality = str(ds.get("Modality") or manifest.modalities[0])
    try:
        found = find_priors(source, patient_id=patient_id, modality=modality, before=study_date,
                            within_days=spec.within_days, exclude_study_uid=str(ds.StudyInstanceUID),
                            max_studies=spec.max_studies, ae_title=settings.ae_title)
    except PriorError as exc:
        out.warnings.append(f"no comparison with prior studies: {exc}")
        return out
    if not found:
        log.info("no prior %s study within %d days in %s", modality, spec.within_days, source.name)
    for prior in found:
        shown = prior.study_date.isoformat() if prior.study_date else "undated"
        try:
            paths = fetch_prior(source, prior, modality, settings.data_path / "priors", ae_title=settings.ae_title)
            if not paths:
                raise PriorError(f"no {modality} series")
            image = load_image(paths, min_slices=manifest.series.min_slices)
        except (PriorError, ImageLoadError, OSError) as exc:
            out.warnings.append(f"prior study of {shown} not used: {exc}")
            continue
        days = (study_date - prior.study_date).days if prior.study_date else None
        out.priors.append(Prior(prior.study_uid, prior.study_date.isoformat() if prior.study_date else None, days,
                                image))
        out.used.append({"study_uid": prior.study_uid, "study_date": shown, "days_before": days,
                         "instances": len(paths)})
        log.info("prior study %s of %s fetched from %s: %d instance(s)", uid_hash(prior.study_uid), shown,
                 source.name, len(paths))
    return out
