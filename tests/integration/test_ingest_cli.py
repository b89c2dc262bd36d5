"""`ragbus ingest` as a user runs it: a folder of mixed files through the bus into the running
processors, per-file errors reported without stopping, the results waited for; a clear timeout
when no processor answers."""

from __future__ import annotations

import json
from pathlib import Path

from infra.settings import Settings
from tests.helpers import run_ragbus
from tests.integration.knowledge_corpus import GLOBEX_TXT, HANDBOOK_MD, IT_SECURITY_HTML, ROUTER_FAQ_PAGES
from tests.integration.knowledge_support import running_processors
from tests.pdfgen import make_pdf


def write_folder(root: Path) -> Path:
    docs = root / "docs"
    (docs / "it").mkdir(parents=True)
    (docs / ".drafts").mkdir()
    (docs / "handbook.md").write_text(HANDBOOK_MD)
    (docs / "it" / "security.html").write_text(IT_SECURITY_HTML)
    (docs / "router.pdf").write_bytes(make_pdf(ROUTER_FAQ_PAGES))
    (docs / "globex.txt").write_text(GLOBEX_TXT)
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    (docs / "logo.png").write_bytes(b"\x89PNG\r\n")
    (docs / ".drafts" / "secret.md").write_text("not for indexing")
    return docs


async def test_ingest_a_folder_and_wait_for_every_result(settings: Settings, tmp_path: Path) -> None:
    docs = write_folder(tmp_path)
    async with running_processors(settings) as processors:
        code, out, err = await run_ragbus(
            settings, "ingest", str(docs), "--tenant", "acme", "--json", "--timeout", "90"
        )
        assert code == 1, err  # one file failed; the others went through
        report = json.loads(out)
        by_id = {f["doc_id"]: f for f in report["files"]}
        assert set(by_id) == {"handbook.md", "it/security.html", "router.pdf", "globex.txt", "broken.pdf"}
        assert [d for d, f in by_id.items() if f["status"] != "ok"] == ["broken.pdf"]
        assert "PDF" in by_id["broken.pdf"]["error"]
        assert report["indexed"] == 4 and report["failed"] == 1 and report["skipped"] == 1
        assert "logo.png" in err and "unsupported file type" in err
        store = processors.store
        assert store is not None
        chunks = {d: await store.call(store.count, "acme", d) for d in by_id}
        assert all(chunks[d] == by_id[d]["chunks"] > 0 for d in by_id if d != "broken.pdf")
        assert chunks["broken.pdf"] == 0

        # Again, with the progress bar and the summary table: the same documents are replaced.
        code, out, err = await run_ragbus(
            settings, "ingest", str(docs / "it"), str(docs / "handbook.md"), "-t", "acme"
        )
        assert code == 0, err
        assert "ingested for tenant acme" in out and "ingesting" in err
        assert await store.call(store.count, "acme", "handbook.md") == chunks["handbook.md"]
        assert await store.call(store.count, "acme", "security.html") == chunks["it/security.html"]
        assert await store.call(store.count, "acme") == sum(chunks.values()) + chunks["it/security.html"]

        code, out, err = await run_ragbus(settings, "ingest", "--delete", "router.pdf", "-t", "acme")
        assert code == 0 and "deleted router.pdf" in out, err
        assert await store.call(store.count, "acme", "router.pdf") == 0


async def test_ingest_says_so_when_no_processor_answers(settings: Settings, tmp_path: Path) -> None:
    doc = tmp_path / "note.md"
    doc.write_text("# Note\n\nNobody will index this.")
    code, _, err = await run_ragbus(settings, "ingest", str(doc), "--tenant", "acme", "--timeout", "3")
    assert code == 3
    assert "no IngestResult for 1 document" in err and "processors running" in err
