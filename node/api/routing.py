"""Dashboard page: what the routing rules make of a stored study (the rule tester of `radnode rules test`,
run on the job table's series and the stored files; nothing is queued or changed)."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import Response

from db.jobs import series_and_paths
from db.records import list_studies, series_id_of
from node.api.dashboard import login_redirect, page, viewer
from node.dicom.header import is_valid_uid
from node.route.router import series_attrs
from node.route.rules import RulesError, load_rules
from node.route.tester import series_report, study_reports
from plugins.registry import unavailable_reason

router = APIRouter(include_in_schema=False)


@router.get("/studies/{study_uid}/routing")
def routing_page(request: Request, study_uid: Annotated[str, PathParam(max_length=64)]) -> Response:
    """Each series of a stored study: the attributes the rules see, each rule's verdict, what would be queued
    now (with the rules file as it is now) and what the router recorded when it routed the series."""
    who = viewer(request)
    if who is None:
        return login_redirect(request)
    if not is_valid_uid(study_uid):
        return page(request, "error.html", {"who": who, "status": 422, "detail": "not a valid Study Instance UID"},
                    422)
    s = request.app.state.settings
    manifests = request.app.state.discovery.manifests
    with request.app.state.sessionmaker() as session:
        found = list_studies(session, study_uid, limit=1)
        if not found:
            return page(request, "error.html", {"who": who, "status": 404, "detail": "no such study"}, 404)
        rows = [series_and_paths(session, series_id_of(session, x["series_uid"])) for x in found[0]["series"]]
    try:
        rules = load_rules(s.rules_file, manifests, [d.name for d in s.destinations])
    except (RulesError, OSError) as exc:
        return page(request, "error.html", {"who": who, "status": 500, "detail": f"invalid routing rules: {exc}"}, 500)
    reports = []
    for series, study, rel_paths in rows:
        attrs = replace(series_attrs(series, study), slice_count=len(rel_paths))  # the count is set on completion
        report = series_report(attrs, series.series_uid, series.series_number,
                               [s.instances_dir / p for p in rel_paths], rules, manifests,
                               unavailable=lambda m: unavailable_reason(m, s.models_path),
                               stat_called_aes=s.stat_called_ae_titles)
        reports.append((report, series.state, series.route_note))
    studies = study_reports([r for r, _, _ in reports], [found[0]["study_uid"]] * len(reports), rules, manifests,
                            s.stat_called_ae_titles)
    context = {"who": who, "study": found[0], "reports": reports, "study_checks": studies[0] if studies else None,
               "rules_source": str(s.rules_file or "the default rules"), "rule_count": len(rules.rules)}
    return page(request, "routing.html", context)
