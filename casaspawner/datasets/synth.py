"""Write synthetic ALMA product trees of every era.

They serve tests, benchmarks and the demo.

The files follow the layouts and formats the real archive products use. See docs/architecture.md
and the reference notes. The trees hold:

* the directories ``<project>/science_goal.uid___…/group.uid___…/member.uid___…/``, with the
  subdirectories ``script``, ``qa``, ``log``, ``calibration`` and ``product``;
* pipeline manifests with
  ``<piperesults><ous><casaversion name=…/><pipeline_version name=…/>``;
* AQUA reports with ``QaSummary/CasaVersion``;
* weblog home pages ``html/t1-1.html``, unpacked or in ``qa/*.weblog.tgz``;
* manual ``*.scriptForCalibration.py`` files opening with CASA's version guard;
* CASA logs with a ``CASA Version`` line.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from xml.sax.saxutils import quoteattr

Evidence = Literal[
    "manifest",
    "manifest-noversion",
    "aquareport",
    "weblog",
    "weblog-tgz",
    "script",
    "casalog",
    "none",
]


@dataclass(frozen=True)
class DatasetSpec:
    """What to write: identifiers, evidence files, and version strings.

    The version strings are exactly as they appear in the files.
    """

    project: str = "2019.1.00994.S"
    mous: str = "uid___A001_X1467_X29e"
    casa: str | None = "6.5.4.9"
    pipeline: str | None = "2023.1.0.124"
    evidence: tuple[Evidence, ...] = ("manifest",)
    recipe: str = "hifa_calimage"
    eb: str = "uid___A002_Xe44309_X7d94"


#: Named eras with the strings real products of that era carry.
ERAS: dict[str, DatasetSpec] = {
    "cycle0-manual": DatasetSpec(
        "2011.0.00101.S", "uid___A002_X1d54a1_X5", "3.4.0", None, ("script",)
    ),
    "cycle2-manual": DatasetSpec(
        "2013.1.00014.S", "uid___A001_X122_X35", "4.2.2", None, ("script", "casalog")
    ),
    "cycle2-pipeline": DatasetSpec(
        "2013.1.00050.S",
        "uid___A001_X13a_X1f",
        "4.2.2-REL (r30986)",
        "31667M (Pipeline-Cycle2-R1-B)",
        ("manifest-noversion", "weblog"),
    ),
    "cycle3-pipeline": DatasetSpec(
        "2015.1.00306.S",
        "uid___A001_X2de_X84",
        "4.5.3-REL (r36115)",
        "36660M (Pipeline-Cycle3-R4-B)",
        ("manifest-noversion", "weblog-tgz"),
    ),
    "cycle4-manual": DatasetSpec(
        "2016.1.00004.S", "uid___A001_X879_Xea", "4.7.2", None, ("script", "casalog")
    ),
    "cycle4-pipeline": DatasetSpec(
        "2016.1.01489.T",
        "uid___A001_X898_Xda",
        "4.7.2-REL (r39762)",
        "39732M (Pipeline-Cycle4-R2-B)",
        ("manifest-noversion", "weblog"),
    ),
    "cycle5": DatasetSpec(
        "2017.1.01355.L", "uid___A001_X1296_X133", "5.1.1-5", "40896M (Pipeline-CASA51-P2-B)"
    ),
    "cycle5-internal": DatasetSpec(
        "2017.1.00017.S", "uid___A001_X1289_X1a1", "5.4.0-68", "42030M"
    ),
    "cycle6": DatasetSpec(
        "2018.1.00035.L", "uid___A001_X133d_Xb5a", "5.4.0-70", "42254M (Pipeline-CASA54-P1-B)"
    ),
    "cycle7": DatasetSpec("2019.1.00003.S", "uid___A001_X1470_X2ef", "6.1.1.15", "2020.1.0.40"),
    "cycle7-internal": DatasetSpec(
        "2019.1.00847.S", "uid___A001_X1467_X264", "6.1.1.10", "2020.1.0.36"
    ),
    "cycle8": DatasetSpec("2021.1.00018.S", "uid___A001_X15b8_X11", "6.2.1.7", "2021.2.0.128"),
    "cycle9": DatasetSpec("2022.1.00014.S", "uid___A001_X2d20_X3ee5", "6.4.1.12", "2022.2.0.64"),
    "cycle10": DatasetSpec(
        "2023.1.00026.S", "uid___A001_X3621_X3d68", "6.5.4.9", "2023.1.0.124+dirty"
    ),
    "cycle11": DatasetSpec(
        "2024.1.00056.S", "uid___A001_X3788_X7af3", "6.6.1.17", "2024.1.0.8", ("aquareport",)
    ),
    "cycle12": DatasetSpec("2025.1.00001.S", "uid___A001_X3833_X1a2", "6.6.6.18", "2025.1.0.36"),
    "cycle12-patch2": DatasetSpec(
        "2025.1.00002.S", "uid___A001_X3833_X1b0", "6.6.6.18", "2025.1.0.37"
    ),
    "vla-numbered": DatasetSpec(
        "2024.1.00099.S", "uid___A001_X3788_X800", "6.6.1.17", "2024.1.1.22"
    ),
    "log-only": DatasetSpec("2016.1.00200.S", "uid___A001_X87a_X11", "4.7.2", None, ("casalog",)),
    "no-evidence": DatasetSpec("2018.1.01575.S", "uid___A001_X133d_X9", None, None, ("none",)),
}


def _dirs(root: Path, spec: DatasetSpec) -> Path:
    goal = spec.mous.replace("uid___", "uid___", 1)
    parts = goal.rsplit("_X", 1)
    sibling = (
        f"{parts[0]}_X{int(parts[1], 16) - 1:x}"
        if len(parts) == 2 and int(parts[1], 16) > 1
        else goal
    )
    member = (
        root
        / spec.project
        / f"science_goal.{sibling}"
        / f"group.{sibling}"
        / f"member.{spec.mous}"
    )
    for sub in ("script", "qa", "log", "calibration", "product"):
        (member / sub).mkdir(parents=True, exist_ok=True)
    return member


def manifest_xml(spec: DatasetSpec, *, with_versions: bool = True) -> str:
    """A pipeline manifest in the shape ``h(if)_exportdata`` writes."""
    mous, recipe = spec.mous, spec.recipe
    versions = ""
    if with_versions:
        if spec.casa:
            versions += f"    <casaversion name={quoteattr(spec.casa)}/>\n"
        if spec.pipeline:
            versions += f"    <pipeline_version name={quoteattr(spec.pipeline)}/>\n"
    return (
        '<?xml version="1.0" ?>\n'
        f'<piperesults name="{mous}">\n'
        f'  <ous name="{mous}">\n'
        f"{versions}"
        f'    <procedure_name name="{recipe}"/>\n'
        f'    <piperequest name="PPR_{mous}.xml"/>\n'
        f'    <session name="session_1">\n'
        f'      <caltables name="{mous}.session_1.caltables.tgz"/>\n'
        f'      <asdm name="{spec.eb}">\n'
        f'        <finalflags name="{spec.eb}.ms.flagversions.tgz"/>\n'
        f'        <applycmds name="{spec.eb}.ms.calapply.txt"/>\n'
        "      </asdm>\n"
        "    </session>\n"
        f'    <weblog name="{mous}.weblog.tgz"/>\n'
        f'    <casa_cmdlog name="{mous}.casa_commands.log"/>\n'
        f'    <pipescript name="{mous}.{recipe}.casa_pipescript.py"/>\n'
        f'    <restorescript name="{mous}.{recipe}.casa_piperestorescript.py"/>\n'
        "  </ous>\n"
        "</piperesults>\n"
    )


def aquareport_xml(spec: DatasetSpec) -> str:
    return (
        '<?xml version="1.0" ?>\n<PipelineAquaReport>\n  <ProjectStructure>\n'
        f"    <OusEntityId>{spec.mous}</OusEntityId>\n"
        f"    <ProposalCode>{spec.project}</ProposalCode>\n"
        "  </ProjectStructure>\n  <QaSummary>\n"
        f"    <CasaVersion>{spec.casa or ''}</CasaVersion>\n"
        f"    <PipelineVersion>{spec.pipeline or ''}</PipelineVersion>\n"
        "    <ProcessingTime>2.1</ProcessingTime>\n  </QaSummary>\n</PipelineAquaReport>\n"
    )


def weblog_html(spec: DatasetSpec) -> str:
    """The weblog home page's two summary tables, as the pipeline's ``t1-1.mako`` renders them."""
    pipeline = spec.pipeline or ""
    doclink = ' (<a href="https://almascience.org/processing/science-pipeline">documentation</a>)'
    environment = (
        '(<a href="javascript:" data-fancybox data-src="#hidden-environment">environment</a>)'
    )
    empty = "<td></td><td></td>"
    return (
        "<!DOCTYPE html>\n<html><head><title>Home</title></head><body>\n"
        '<div class="row"><div class="col-md-6"><h2>Observation Overview</h2>\n'
        '<table class="table table-condensed" summary="Data Details"><thead><tr>'
        '<th class="col-md-5"></th><th class="col-md-7"></th></tr></thead><tbody>\n'
        f"<tr><th>Project</th><td>{spec.project}</td></tr>\n"
        f"<tr><th>OUS Status Entity id</th><td>{spec.mous}</td></tr>\n"
        "<tr><th>Observation Start</th><td>2023-10-14 22:01:12&nbsp;UTC</td></tr>\n"
        "</tbody></table></div>\n"
        '<div class="col-md-6"><h2>Pipeline Summary</h2>\n'
        '<table class="table table-condensed"><thead><tr>'
        '<th class="col-md-3"></th><th class="col-md-6"></th>'
        '<th class="col-md-2"></th><th class="col-md-1"></th>'
        "</tr></thead><tbody>\n"
        f"<tr><th>PPR ID</th><td></td>{empty}</tr>\n"
        f"<tr>\n  <th>Pipeline Version</th>\n  <td>{pipeline}\n{doclink}\n  </td>{empty}\n</tr>\n"
        "<tr>\n  <th>CASA Version</th>\n"
        f"  <td>{spec.casa or ''} {environment}</td>{empty}\n</tr>\n"
        f"<tr><th>Pipeline Start</th><td>2023-10-15 12:00:00&nbsp;UTC</td>{empty}</tr>\n"
        "</tbody></table></div></div>\n</body></html>\n"
    )


def calibration_script(spec: DatasetSpec) -> str:
    """Opening of a manual calibration script, with CASA's version guard."""
    version = spec.casa or ""
    return (
        "# ALMA Data Reduction Script\n\n# Calibration\n\n"
        "thesteps = []\nstep_title = {0: 'Import of the ASDM'}\n\n"
        "try:\n  print('List of steps to be executed ...', mysteps)\n"
        "  thesteps = mysteps\nexcept:\n"
        "  print('global variable mysteps not set.')\n\n"
        "import re\n\nimport casadef\n\n"
        f"if re.search('^{version}', casadef.casa_version) == None:\n"
        " sys.exit('ERROR: PLEASE USE THE SAME VERSION OF CASA THAT YOU USED "
        f"FOR GENERATING THE SCRIPT: {version}')\n\n"
        "if 0 in thesteps:\n"
        f"  importasdm('{spec.eb}', asis='Antenna Station Receiver Source CalAtmosphere')\n"
    )


def casa_log(spec: DatasetSpec) -> str:
    version = spec.casa or ""
    return (
        "2016-11-02 10:12:01\tINFO\t::casa\t\n"
        f"2016-11-02 10:12:01\tINFO\t::casa\tCASA Version {version}\n"
        "2016-11-02 10:12:01\tINFO\t::casa\t"
        "  Descriptor: Common Astronomy Software Applications\n"
        f"2016-11-02 10:12:05\tINFO\timportasdm::::casa\t##### Begin Task: importasdm #####\n"
    )


def _tgz(path: Path, members: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))


def write_dataset(root: Path, era: str | None = None, spec: DatasetSpec | None = None) -> Path:
    """Write one product tree under ``root``, and return its ``member.uid___…`` directory.

    Give a named ``era`` (see ``ERAS``) or a full ``spec``.
    """
    if spec is None:
        if era is None or era not in ERAS:
            raise ValueError(f"unknown era {era!r}; choose one of {', '.join(ERAS)}")
        spec = ERAS[era]
    member = _dirs(Path(root), spec)
    prefix = f"member.{spec.mous}"
    stamp = "pipeline-20231015T120000"
    for kind in spec.evidence:
        if kind in ("manifest", "manifest-noversion"):
            text = manifest_xml(spec, with_versions=kind == "manifest")
            (member / "script" / f"{prefix}.{spec.recipe}.pipeline_manifest.xml").write_text(text)
        elif kind == "aquareport":
            (member / "qa" / f"{prefix}.{spec.recipe}.pipeline_aquareport.xml").write_text(
                aquareport_xml(spec)
            )
        elif kind == "weblog":
            html = member / "qa" / f"{prefix}.{spec.recipe}.weblog" / stamp / "html"
            html.mkdir(parents=True, exist_ok=True)
            (html / "t1-1.html").write_text(weblog_html(spec))
            (html / "index.html").write_text(
                '<html><frameset><frame src="t1-1.html"/></frameset></html>\n'
            )
        elif kind == "weblog-tgz":
            _tgz(
                member / "qa" / f"{prefix}.{spec.recipe}.weblog.tgz",
                {
                    f"{stamp}/html/index.html": "<html></html>\n",
                    f"{stamp}/html/t2-1.html": (
                        "<html><table><tr><th>CASA Version</th><td>9.9.9</td></tr></table></html>"
                    ),
                    f"{stamp}/html/t1-1.html": weblog_html(spec),
                },
            )
        elif kind == "script":
            (member / "script" / f"{spec.eb}.ms.scriptForCalibration.py").write_text(
                calibration_script(spec)
            )
            (member / "script" / f"{prefix}.scriptForPI.py").write_text("# scriptForPI\n")
        elif kind == "casalog":
            name = (
                "casapy-20161102-101201.log"
                if (spec.casa or "").startswith(("3.", "4."))
                else "casa-20231015-101201.log"
            )
            (member / "log" / name).write_text(casa_log(spec))
    mous_uid = spec.mous.replace("___", "://").replace("_", "/")
    (member / f"{prefix}.README.txt").write_text(
        f"ALMA Data Product README\nProject: {spec.project}\nMOUS: {mous_uid}\n"
    )
    return member


#: A script simulating a small ALMA MeasurementSet with casatools.
#:
#: A CASA environment's Python runs it with the target MS as its argument. It prints the row count.
#: The demo and the images' smoke tests both run it.
SIMULATE_MS = """
import sys
import casatools

target = sys.argv[1]
me, sm, tb = casatools.measures(), casatools.simulator(), casatools.table()
alma = me.observatory("ALMA")
east = [0.0, 48.0, -36.0, 25.0, -61.0]
north = [0.0, 17.0, 44.0, -52.0, -23.0]
sm.open(target)
sm.setconfig(
    telescopename="ALMA", x=east, y=north, z=[0.0] * 5, dishdiameter=[12.0] * 5,
    mount=["alt-az"] * 5, antname=["DA41", "DA42", "DV03", "DV07", "PM02"],
    padname=["A001", "A002", "A003", "A004", "A005"], coordsystem="local",
    referencelocation=alma,
)
sm.setspwindow(spwname="SPW0", freq="230GHz", deltafreq="15.625MHz", freqresolution="15.625MHz",
               nchannels=16, stokes="XX YY")
sm.setfeed(mode="perfect X Y")
sm.setfield(
    sourcename="DemoQuasar", sourcedirection=me.direction("J2000", "12h30m49.4s", "-23d23m28s")
)
sm.setlimits(shadowlimit=0.001, elevationlimit="8deg")
sm.setauto(autocorrwt=0.0)
sm.settimes(
    integrationtime="10s", usehourangle=True, referencetime=me.epoch("UTC", "2024/03/21/00:00:00")
)
sm.observe("DemoQuasar", "SPW0", starttime="-150s", stoptime="150s")
cl = casatools.componentlist()
cl.addcomponent(
    dir="J2000 12h30m49.4s -23d23m28s", flux=1.5, fluxunit="Jy", freq="230GHz", shape="point"
)
cl.rename(target + ".cl")
cl.close()
sm.predict(complist=target + ".cl")
sm.setnoise(mode="simplenoise", simplenoise="0.05Jy")
sm.corrupt()
sm.close()
tb.open(target)
print("ROWS", tb.nrows())
tb.close()
"""
