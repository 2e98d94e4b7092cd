"""`fedtiny privacy-report RUN_DIR`: the privacy evidence of one run, for a data protection officer.

Two files in the run folder, the same content: privacy_report.html (one self-contained page, as report.html: no
script, no style sheet, font or image from elsewhere, no request) and privacy_report.md. From the run's own records:

    what left each device     per round and device: messages, bytes and tensors (the coordinator's log); with a
                              capture, every MQTT message each device published (the broker's record)
    what the coordinator saw  individual decrypted updates, or only masked sums under secure aggregation
    differential privacy      epsilon and delta per device and for the fleet, recomputed with dp-accounting
                              (fedtiny.privacy) from the run's noise multiplier and each device's rounds
    keys                      algorithms, key ids (fingerprints of public keys only), where keys live, rotation and
                              revocation (fedtiny/protocol/keys.py and the run's fleet folder)
    retention                 what is stored where, and for how long
    audit log                 its check (fedtiny.audit.verify) and its rounds
    capture scan              every carried payload searched for every device sample (sample_scan.py)
    requirements              GDPR Art. 25/30/32/35, HIPAA 164.312 and IEC 62443-3-3 -> mechanism -> evidence here

Bad input (no such folder, not a run folder, a corrupt audit log or capture, a wrong key) is a ReportError: one line.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from .report_data import data_flow
from .report_html import STYLE


class ReportError(ValueError):
    """A run folder the report cannot be written from; the message says what is wrong."""


# --- a small document model, rendered as Markdown and as HTML -----------------------------------------------------

@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)  # ("p", text) | ("warning", text) | ("table", header, rows)

    def p(self, text: str) -> Section:
        self.blocks.append(("p", text))
        return self

    def warning(self, text: str) -> Section:
        self.blocks.append(("warning", text))
        return self

    def table(self, header: list[str], rows: list[list]) -> Section:
        self.blocks.append(("table", header, [[str(c) for c in r] for r in rows]))
        return self


def to_markdown(title: str, sections: list[Section]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"# {title}", ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        for block in s.blocks:
            if block[0] == "p":
                lines += [block[1], ""]
            elif block[0] == "warning":
                lines += [f"> **Warning:** {block[1]}", ""]
            else:
                _, header, rows = block
                lines.append("| " + " | ".join(cell(h) for h in header) + " |")
                lines.append("|" + "---|" * len(header))
                lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
                lines.append("")
    return "\n".join(lines)


def to_html(title: str, sections: list[Section]) -> str:
    parts = [f"<h1>{escape(title)}</h1>"]
    for s in sections:
        parts.append(f"<h2>{escape(s.title)}</h2>")
        for block in s.blocks:
            if block[0] == "p":
                parts.append(f"<p>{escape(block[1])}</p>")
            elif block[0] == "warning":
                parts.append(f'<div class="warning"><p><b>Warning:</b> {escape(block[1])}</p></div>')
            else:
                _, header, rows = block
                head = "".join(f'<th class="text">{escape(h)}</th>' for h in header)
                body = "".join("<tr>" + "".join(f'<td class="text">{escape(c)}</td>' for c in r) + "</tr>\n"
                               for r in rows)
                parts.append(f"<table><thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n" + "\n".join(parts) + "\n</body>\n</html>\n")


# --- the run's records ------------------------------------------------------------------------------------------

@dataclass
class Run:
    path: Path
    run: dict  # metrics.json's run section
    rounds: list[dict]
    events: list[dict]  # the coordinator's log

    @property
    def secure_aggregation(self) -> dict | None:
        """The secure-aggregation settings when the run used it (metrics.json run.secagg, or the coordinator's
        secagg events), else None."""
        settings = self.run.get("secagg") or self.run.get("secure_aggregation")
        if settings:
            return settings if isinstance(settings, dict) else {"on": True}
        if any(str(e.get("event", "")).startswith("secagg") for e in self.events):
            return {"on": True}
        return None


def load_run(run_dir: str | Path) -> Run:
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(f"{path}: no such run folder")
    metrics = path / "metrics.json"
    if not metrics.is_file():
        raise ReportError(f"{path}: not a run folder of `fedtiny simulate` (no metrics.json)")
    try:
        data = json.loads(metrics.read_text())
        run, rounds = data["run"], data["rounds"]
    except (ValueError, KeyError, TypeError):
        raise ReportError(f"{metrics}: not a metrics file of `fedtiny simulate`") from None
    events = []
    log = path / "coordinator.jsonl"
    if log.is_file():
        for number, line in enumerate(log.read_text().splitlines(), start=1):
            try:
                events.append(json.loads(line))
            except ValueError:
                raise ReportError(f"{log}: line {number}: not JSON") from None
    return Run(path, run, rounds, events)


def _short(digest: str, n: int = 16) -> str:
    return digest[:n] if digest else "-"


def fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


# --- sections -----------------------------------------------------------------------------------------------------

def overview(r: Run, audit: dict | None, capture: dict | None) -> Section:
    run = r.run
    privacy = run.get("privacy")
    s = Section("Summary")
    rows = [["run", f"{run.get('scenario')}, {run.get('nodes')} devices, {len(r.rounds)} rounds, engine "
                    f"{run.get('engine')}, seed {run.get('seed')}"],
            ["raw samples", "kept on each device (nodes/<device>.npz stands in for its flash); none is sent"],
            ["uplink", "DELTA: each device's clipped integer changes of the trainable tensors, with its example "
                       "count, loss and accuracy; signed (EdDSA) and encrypted end to end (ChaCha20-Poly1305)"
             if run.get("engine") != "flower" else
             "DELTA message bodies in Flower's simulation engine (no MQTT link, no envelope)"],
            ["coordinator sees", "only masked sums (secure aggregation)" if r.secure_aggregation else
             "each device's individual update, decrypted (no secure aggregation in this run)"],
            ["differential privacy", f"epsilon {privacy['epsilon']:.3f} at delta {privacy['delta']:g} for the fleet "
                                     f"(budget {privacy['budget']:g}; {privacy['mechanism']})" if privacy else
             "off: no noise, no privacy accounting"],
            ["audit log", audit["line"] if audit else "none in this run folder"],
            ["capture scan", capture["line"] if capture else "no capture (run `fedtiny simulate --capture`)"]]
    return s.table(["item", "this run"], rows)


def left_devices(r: Run, payloads) -> Section:
    s = Section("What left each device")
    flows = data_flow(r.path / "coordinator.jsonl", r.run.get("trainable", []))
    uplinks = [f for f in flows if f["direction"] == "device -> coordinator"]
    s.p("From the coordinator's log: every DELTA it accepted, per round and device, with its bytes on the wire (whole "
        "MQTT payloads: envelope and chunk headers included) and the tensors it carried. Refused messages are "
        "listed with their reason below the table.")
    rows = [[f["round"], f["device"], f["message"], f"{f['bytes']:,}",
             ", ".join(r.run.get("trainable", [])) + "; example count, loss, accuracy"] for f in
            sorted(uplinks, key=lambda f: (f["round"], f["device"]))]
    for e in r.events:  # under secure aggregation: each device's masked DELTA and key-exchange messages
        if e.get("event") == "secagg_round" and isinstance(e.get("uplink_bytes"), dict):
            rows += [[e["round"], str(device), "secure-aggregation stages and masked DELTA", f"{int(n):,}",
                      "round keys, encrypted mask-seed shares, masked integer changes of "
                      + ", ".join(r.run.get("trainable", []))] for device, n in sorted(e["uplink_bytes"].items())]
    s.table(["round", "device", "message", "bytes", "contents"], rows)
    refused = [e for e in r.events if e.get("event") in ("reply_rejected", "message_rejected")]
    if refused:
        s.table(["round", "device", "refused", "reason"],
                [[e.get("round", "-"), e.get("device", "-"), e["event"].replace("_", " "), e.get("reason", "")]
                 for e in refused])
    if payloads is not None:
        from .sample_scan import message_kind

        per_client: dict[tuple[str, str, str], list[int]] = {}
        for p in payloads:
            kind, body = message_kind(p.data)
            if p.kind != "publish":
                kind = f"{kind} ({p.kind})"
            per_client.setdefault((p.client, kind, body or "-"), []).append(len(p.data))
        s.p("From the broker's capture: every MQTT message each client published (the coordinator's rows are what "
            "it sent to devices), by message kind read from its protocol header, and whether its body was "
            "encrypted. Later chunks of a chunked message are counted as chunks.")
        s.table(["client", "message", "body", "messages", "bytes"],
                [[client, kind, sealed, len(sizes), f"{sum(sizes):,}"]
                 for (client, kind, sealed), sizes in sorted(per_client.items())])
    return s


def coordinator_saw(r: Run, payloads) -> Section:
    s = Section("What the coordinator saw")
    settings = r.secure_aggregation
    if payloads is not None:
        from .sample_scan import message_kind

        deltas = [body for kind, body in map(message_kind, (p.data for p in payloads)) if kind == "DELTA"]
        masked = sum("masked" in body for body in deltas)
        s.p(f"The capture holds {len(deltas)} DELTAs; {masked} of them carry the MASKED flag (secure aggregation).")
    if settings:
        s.p("Secure aggregation: each device added pairwise masks to its integer update before encrypting it; the "
            "coordinator could unmask only the sum over a round's devices, never a single device's update. "
            "Settings: " + json.dumps(settings, sort_keys=True, default=str) + ".")
        rows = [secagg_row(e) for e in r.events if e.get("event") == "secagg_round"]
        if rows:
            s.table(["round", "survivors (their masked deltas are in the sum)", "dropped after sharing keys",
                     "wrong shares", "threshold of degree", "what the coordinator held"], rows)
    else:
        s.warning("No secure aggregation in this run: the coordinator decrypted every device's individual update "
                  "(its clipped integer changes, example count, loss and accuracy) and held it in state.db. "
                  "End-to-end encryption protects updates from the broker and the network, not from the coordinator "
                  "(docs/security.md, 'Curious coordinator').")
    return s


def secagg_row(event: dict) -> list:
    """One masked round as the coordinator's secagg_round record tells it (server/secagg.py)."""
    keys = next((st for st in event.get("stages", []) if st.get("stage") == "keys"), {})
    survivors = event.get("survivors", [])
    return [event.get("round", "-"), f"{len(survivors)}: {', '.join(survivors)}" if survivors else "none",
            ", ".join(event.get("dropped", [])) or "none", ", ".join(event.get("bad_shares", [])) or "none",
            f"{keys['threshold']} of {keys['degree']}" if "degree" in keys else "-",
            event.get("seen") or f"nothing: the round failed ({event.get('failure', 'no outcome')})"]


def differential_privacy(r: Run) -> Section:
    from fedtiny.privacy import epsilon

    s = Section("Differential privacy")
    p = r.run.get("privacy")
    if not p:
        return s.p("Off: no noise was added and no privacy loss was accounted. The model and each update carry "
                   "whatever they reveal about the devices' data.")
    if p.get("distributed"):
        return _distributed_privacy(s, r, p)
    z, delta = p["noise_multiplier"], p["delta"]
    s.p(f"Mechanism: {p['mechanism']}. Clip norm {p['clip_norm']:g} (real units), noise multiplier z = {z:.4f} "
        f"(noise standard deviation z x clip norm on the sum), delta {delta:g}, budget epsilon {p['budget']:g}, "
        f"{p['noised_rounds']} noised rounds. Each epsilon below is computed here again with dp-accounting's RDP "
        "accountant from z, delta and the device's rounds, beside the value the coordinator recorded.")
    _clip_rule(s, p)
    rows = []
    for device, releases in sorted(p["device_rounds"].items()):
        mine = epsilon(z, releases, delta)
        rows.append([device, releases, f"{mine:.4f}", f"{p['device_epsilon'].get(device, math.nan):.4f}", f"{delta:g}"])
    fleet = epsilon(z, max(p["device_rounds"].values(), default=0), delta)
    rows.append(["fleet (every device's guarantee)", max(p["device_rounds"].values(), default=0), f"{fleet:.4f}",
                 f"{p['epsilon']:.4f}", f"{delta:g}"])
    s.table(["device", "rounds in a noised aggregate", "epsilon (dp-accounting, here)", "epsilon (coordinator)",
             "delta"], rows)
    if r.run.get("stopped"):
        s.p(f"The run stopped early: {r.run['stopped']}.")
    return s


def _clip_rule(s: Section, p: dict) -> None:
    """How the run's clip norm was chosen (runs before the rule recorded none)."""
    if p.get("clip_norm_rule"):
        s.p(f"How the clip norm was chosen: {p['clip_norm_rule']}.")


def distributed_epsilon(p: dict, survivors: list[int]) -> float:
    """A device's epsilon recomputed from the run's recorded parameters: each of its rounds' rho from the
    distributed discrete Gaussian's bound (fedtiny.privacy.distributed_rho), summed, as dp-accounting's ZCDpEvent."""
    from fedtiny.privacy import distributed_rho, zcdp_epsilon

    rho = sum(distributed_rho(p["clip_norm"], p["device_noise_sigma"], n, p["sigma2_min_lsb"], p["l1_lsb"])
              for n in survivors)
    return zcdp_epsilon(rho, p["delta"])


def _distributed_privacy(s: Section, r: Run, p: dict) -> Section:
    delta = p["delta"]
    s.p(f"Mechanism: {p['mechanism']}. Each device clips its update to {p['clip_norm']:g} (real units) and adds "
        f"discrete Gaussian integers of standard deviation {p['device_noise_sigma']:.4g} (real units; at least "
        f"{p['sigma2_min_lsb']:g} LSB^2 per element) before masking, so the coordinator sees only the survivors' "
        f"noised sum. The noise is calibrated so that {p['min_survivors']} survivors (the round's expected "
        f"survivors, at least the secure-aggregation threshold; a round with fewer is not unmasked) give noise "
        f"multiplier z = {p['noise_multiplier']:.4f} on the sum; delta {delta:g}, budget epsilon {p['budget']:g}, "
        f"{p['noised_rounds']} noised rounds (survivors: {', '.join(str(n) for n in p['round_survivors'])}). Each "
        "epsilon below is computed here again from these parameters and the device's rounds, with dp-accounting's "
        "RDP accountant, beside the value the coordinator recorded.")
    _clip_rule(s, p)
    if "clamp_delta" in p:
        s.p(f"The devices clamp their noised values 12 noise standard deviations beyond the clipped update (secure "
            f"aggregation's bounds); the accounting above is for unclamped noise, and the clamp adds "
            f"{p['clamp_delta']:.2g} to delta (the chance it acts anywhere in the run, times 1 + e^epsilon): the "
            f"fleet's guarantee is epsilon {p['epsilon']:.4f} at delta {delta:g} + {p['clamp_delta']:.2g}.")
    rows = []
    for device, survivors in sorted(p["device_survivors"].items()):
        rows.append([device, len(survivors), f"{distributed_epsilon(p, survivors):.4f}",
                     f"{p['device_epsilon'].get(device, math.nan):.4f}", f"{delta:g}"])
    worst = max(p["device_survivors"].values(), key=lambda n: distributed_epsilon(p, n), default=[])
    rows.append(["fleet (every device's guarantee)", len(worst), f"{distributed_epsilon(p, worst):.4f}",
                 f"{p['epsilon']:.4f}", f"{delta:g}"])
    s.table(["device", "rounds in a noised sum", "epsilon (dp-accounting, here)", "epsilon (coordinator)", "delta"],
            rows)
    if r.run.get("stopped"):
        s.p(f"The run stopped early: {r.run['stopped']}.")
    return s


def keys_inventory(r: Run, audit_key_id: str | None) -> Section:
    s = Section("Crypto and key inventory")
    s.p("Key ids are the first 16 hex digits of the SHA-256 of a public key or certificate; no private key, "
        "password or shared secret is read into this report.")
    algorithms = [
        ["message signatures", "EdDSA (Ed25519's scheme over BLAKE2b-512, Monocypher)", "every message, both ways"],
        ["update confidentiality", "X25519 + keyed-BLAKE2b key derivation, ChaCha20-Poly1305 (RFC 8439)",
         "DELTA and GLOBAL_UPDATE, end to end, a key per (fleet, device, direction)"],
        ["replay protection", "ReplayGuard on (run, round, seq), seqs persisted before use", "every message"],
        ["transport (deployments)", "TLS 1.2+ to mosquitto, EC P-256 fleet CA, client certificates, CRL",
         "device <-> broker <-> coordinator; the embedded simulation broker is plain MQTT on loopback"],
        ["broker login", "mosquitto $7$ password file (PBKDF2-SHA512), ACL per identity", "every client"],
        ["audit log", "Ed25519 (cryptography) over canonical JSON lines, SHA-256 hash chain", "the coordinator"],
    ]
    if r.secure_aggregation:
        algorithms.append(["secure aggregation", "pairwise X25519 agreements, ChaCha20 mask expansion, Shamir shares",
                           "masked integer updates"])
    s.table(["purpose", "algorithm", "where"], algorithms)
    fleet = r.path / "fleet"
    rows = []
    if (fleet / "fleet.json").is_file():
        manifest = json.loads((fleet / "fleet.json").read_text())
        rows.append(["fleet device CA", "ca/ca.crt (key ca/ca.key: the provisioning machine, offline)",
                     fingerprint((fleet / "ca/ca.crt").read_bytes()) if (fleet / "ca/ca.crt").is_file() else "-"])
        coordinator = manifest["coordinator"]
        rows.append(["coordinator message identity", "coordinator/identity.key (0600, the coordinator host)",
                     fingerprint(bytes.fromhex(coordinator["public"]))])
        if audit_key_id:
            rows.append(["coordinator audit key (Ed25519)", "coordinator/audit.key (0600); public: audit.pub",
                         audit_key_id])
        for name, entry in sorted(manifest["devices"].items()):
            rows.append([f"device {name}: identity, TLS certificate serial {entry['cert_serial']}",
                         f"devices/{name}/ (0600, on the device only)", fingerprint(bytes.fromhex(entry["public"]))])
        revoked = {}
        if (fleet / "coordinator/revoked.json").is_file():
            revoked = json.loads((fleet / "coordinator/revoked.json").read_text())
        s.table(["key", "where it lives", "key id"], rows)
        listed = ", ".join(f"{n} (revoked {v.get('revoked')})" for n, v in revoked.items()) or "none"
        s.p(f"Revoked devices: {listed}. "
            "Revocation (`fedtiny keys --revoke NAME`) puts the certificate on the CRL, removes the password, denies "
            "the name every topic and lists it in coordinator/revoked.json, which a running coordinator rereads. "
            "Rotation (`--rotate NAME`) issues a new identity, certificate and password and revokes the old "
            "certificate; certificates last 825 days. The coordinator's identity and audit key are not rotated "
            "within a fleet (docs/security.md).")
    else:
        s.p("This run has no fleet folder (the flower engine has no MQTT link and no per-device keys).")
    return s


def retention(r: Run) -> Section:
    s = Section("Retention: what is stored where, and for how long")
    s.p("fedtiny deletes nothing by itself: every file below stays until its owner deletes it. A simulation's run "
        "folder is replaced by the next run written to the same --out.")
    rows = [  # (file, what it holds, where, how long, what to look for in the run folder)
        ["nodes/<device>.npz", "each device's raw samples (int8)", "the device (its flash); here the run folder",
         "as long as the device keeps them; never sent"],
        ["state/<device>.node", "a device's persisted state: the global model, replay counters and seq, the sealed DELTA until ACKed, "
         "the change not yet sent (error feedback)",
         "the device", "until the device is reset"],
        ["state.db", "every accepted device update (individual DELTA integers), the global model of every round, "
                     "the device registry, the privacy ledger", "the coordinator (file mode 0600)",
         "until deleted: prune it once the run's model is released"],
        ["coordinator.jsonl", "the coordinator's event log: device names, rounds, bytes, refusals", "the coordinator",
         "until deleted"],
        ["audit.jsonl", "the signed audit log: pseudonymous participants, settings, model hashes, epsilon",
         "the coordinator (0600)", "keep for the review period"],
        ["capture.jsonl", "every MQTT payload the broker carried (ciphertext for updates)", "the run folder, only "
         "with --capture", "until deleted"],
        ["global.ftm, plan.ftp", "the final global model and the training plan", "the run folder", "until deleted"],
        ["fleet/", "keys and certificates (private halves 0600)", "the provisioning folder; each part on its host",
         "until the fleet is retired"],
        ["broker", "retained STATUS messages and queued downlinks (mosquitto persistence if enabled)", "the broker",
         "until replaced, or the session expires"],
    ]
    def here(name: str) -> str:
        if name == "broker":
            return "-"
        first = name.split(",")[0].split("/")[0]
        return "yes" if (r.path / first).exists() else "no"

    return s.table(["file", "holds", "where", "kept", "in this run folder"],
                   [[*row, here(row[0])] for row in rows])


def audit_section(r: Run, key_file: Path | None):
    """(the audit log's section, a summary line, the audit key id); ReportError for a corrupt log or a wrong key."""
    from fedtiny.audit import AuditError, load_public_key, load_private_key, verify

    s = Section("Audit log")
    log = r.path / "audit.jsonl"
    if not log.is_file():
        s.warning("This run folder has no audit.jsonl: its coordinator kept no signed audit log.")
        return s, None, None
    key_file = key_file or r.path / "fleet" / "audit.pub"
    try:
        public = load_public_key(key_file)
        result = verify(log, public)
    except AuditError as err:
        raise ReportError(str(err)) from None
    line = (f"audit.jsonl: {result.lines} lines verified, signatures and hash chain intact, closed (key "
            f"{result.key_id})")
    s.p(line + ". Check it yourself: fedtiny audit verify audit.jsonl --key fleet/audit.pub")
    names = {}
    private = r.path / "fleet" / "coordinator" / "audit.key"
    if private.is_file():  # the coordinator's side: its pseudonyms can be mapped back
        from fedtiny.audit import pseudonym, pseudonym_key

        secret = pseudonym_key(load_private_key(private))
        names = {pseudonym(secret, f.stem): f.stem for f in sorted((r.path / "nodes").glob("*.npz"))}
    rows = []
    for e in result.events:
        kind = e["event"]
        if kind == "round_configured":
            rows.append([e["seq"], kind, e["round"], f"cohort {len(e['cohort'])}; clip {e['clip_norm']:g}; noise z "
                         f"{e['noise_multiplier']:.3f}; sampling {e['sampling_fraction']:g}; quorum {e['quorum']:g}; "
                         f"secure aggregation {'on' if e.get('secure_aggregation') else 'off'}; model "
                         f"{_short(e['model_hash'])}"])
        elif kind == "round_completed":
            eps = f"; epsilon {e['epsilon']:.3f} at delta {e['delta']:g}" if "epsilon" in e else ""
            rows.append([e["seq"], kind, e["round"], f"participants {', '.join(e['participants'])}; model "
                         f"{_short(e['model_hash'])}{eps}"])
        elif kind == "coordinator_started":
            rows.append([e["seq"], kind, e["round"], f"plan {_short(e['plan_hash'])}; model {_short(e['model_hash'])}; "
                         f"{len(e['enrolled'])} enrolled, {len(e['revoked'])} revoked"])
        else:
            rows.append([e["seq"], kind, e.get("round", "-"), json.dumps(
                {k: v for k, v in e.items() if k not in ("seq", "prev", "key", "ts", "event", "round")},
                default=str)[:160]])
    s.table(["line", "event", "round", "what"], rows)
    if names:
        s.p("Pseudonyms (a keyed hash of each device's name; only the holder of the coordinator's audit key can map "
            "them): " + ", ".join(f"{p} = {d}" for p, d in sorted(names.items(), key=lambda x: x[1])) + ".")
    return s, {"line": line}, result.key_id


def capture_section(r: Run, payloads):
    """(the capture scan's section, a summary line or None)."""
    from fedtiny.planfile import load_plan

    from .sample_scan import ENCODINGS, input_quantization, load_samples, scan

    s = Section("Capture scan: raw samples in what the broker carried")
    if payloads is None:
        s.p("No capture in this run folder. `fedtiny simulate --capture` records every payload the embedded broker "
            "carries (capture.jsonl), and this report then searches all of it for every device's samples.")
        return s, None
    samples = load_samples(r.path / "nodes")
    if not samples or not (r.path / "plan.ftp").is_file():
        raise ReportError(f"{r.path}: a capture without the nodes' samples (nodes/*.npz) or plan.ftp to scan for")
    scale, zero_point = input_quantization(load_plan(r.path / "plan.ftp"))
    result = scan(payloads, samples, scale, zero_point)
    what = (f"{result.samples:,} samples of {result.devices} devices, each as {', '.join(ENCODINGS)} (the float "
            f"values are the int8 samples dequantized with the model's input scale {scale:g} and zero point "
            f"{zero_point}), at any byte offset, in every payload and in the {result.transfers} chunked transfers "
            f"reassembled from their chunks, also inside every zlib, gzip or deflate stream found in them "
            f"({result.inflated} inflated)")
    if result.findings:
        line = (f"RAW SAMPLES FOUND: {len(result.findings)} occurrences in "
                f"{len({f.payload for f in result.findings})} of {result.payloads:,} payloads ({result.bytes:,} bytes)")
        s.warning(line + ".")
        s.table(["payload", "client", "topic", "sample of", "sample", "encoding", "offset", "compressed stream at"],
                [[f.payload, f.client, f.topic, f.device, f.sample, f.encoding, f.offset,
                  "-" if f.inflated_at is None else f.inflated_at] for f in result.findings[:200]])
    else:
        line = f"no raw sample found in {result.payloads:,} payloads, {result.bytes:,} bytes"
        s.p(line.capitalize() + ".")
    s.p(f"Searched for: {what}.")
    if result.uniform:
        s.p(f"{len(result.uniform)} samples are too uniform to search for without matching any padding (fewer than "
            "3 distinct byte values, or shorter than 8 bytes): "
            + ", ".join(f"{d}[{i}]" for d, i in result.uniform[:20]) + (" ..." if len(result.uniform) > 20 else ""))
    s.p("The scan covers the payloads as the broker carried them. Updates and global models travel encrypted "
        "(ChaCha20-Poly1305): ciphertext cannot show a sample, so for them it is the encryption that makes a clean "
        "scan meaningful, and the scan checks that nothing was sent beside it in the clear (JOIN, TASK, STATUS, "
        "LEAVE are signed, not encrypted).")
    return s, {"line": line, "findings": len(result.findings), "payloads": result.payloads, "bytes": result.bytes}


def requirements(r: Run, audit: dict | None, capture: dict | None) -> Section:
    s = Section("Requirements, mechanisms and evidence in this run")
    dp = r.run.get("privacy")
    secagg = r.secure_aggregation
    audit_ev = audit["line"] if audit else "no audit log in this run"
    capture_ev = capture["line"] if capture else "no capture in this run (--capture)"
    dp_ev = (f"epsilon {dp['epsilon']:.3f} at delta {dp['delta']:g}, noise multiplier {dp['noise_multiplier']:.3f}, "
             f"clip {dp['clip_norm']:g}" if dp else "not used in this run")
    rows = [
        ["GDPR Art. 25 (data protection by design and by default)", "samples never leave devices; only clipped "
         "sparse integer updates of the trainable tensors are sent; DP and secure aggregation when configured",
         f"'What left each device'; capture: {capture_ev}; DP: {dp_ev}"],
        ["GDPR Art. 30 (records of processing)", "data-flow manifest (data_flow.csv), coordinator log, signed "
         "audit log", f"data_flow.csv; {audit_ev}"],
        ["GDPR Art. 32 (security of processing)", "end-to-end signatures and encryption, TLS and ACL at the broker, "
         "replay protection, keys 0600, revocation", "'Crypto and key inventory'"],
        ["GDPR Art. 35 (impact assessment)", "what each party sees and the measured privacy loss; this report",
         "'What the coordinator saw'; 'Differential privacy'"],
        ["HIPAA 164.312(a) access control", "a certificate, password and ACL per device identity; revocation",
         "'Crypto and key inventory' (revoked devices)"],
        ["HIPAA 164.312(b) audit controls", "hash-chained audit log signed by the coordinator (Ed25519)", audit_ev],
        ["HIPAA 164.312(c) integrity", "EdDSA signature on every message; signed audit lines; model hashes",
         "audit log: a model hash per round"],
        ["HIPAA 164.312(d) person or entity authentication", "per-device identities from the fleet CA; mutual TLS "
         "in deployments", "'Crypto and key inventory'"],
        ["HIPAA 164.312(e) transmission security", "ChaCha20-Poly1305 end to end; TLS to the broker in deployments",
         f"capture: {capture_ev}"],
        ["IEC 62443-3-3 SR 1.1/1.2 identification and authentication", "unique identities for devices and the "
         "coordinator; broker logins", "'Crypto and key inventory'"],
        ["IEC 62443-3-3 SR 2.8/2.9/2.10 auditable events, audit storage, response to failures", "the signed audit "
         "log, fsynced per line; `fedtiny audit verify`", audit_ev],
        ["IEC 62443-3-3 SR 3.1 communication integrity", "signatures and AEAD on messages; replay guard",
         "refused messages in 'What left each device'"],
        ["IEC 62443-3-3 SR 4.1 information confidentiality", "end-to-end encryption; secure aggregation" +
         (" (used)" if secagg else " (not in this run)"), "'What the coordinator saw'"],
        ["IEC 62443-3-3 SR 5.1/5.2 network segmentation, zone boundary protection", "devices, broker and coordinator "
         "as zones; the broker's ACL as the conduit's rule", "broker/acl in the fleet folder"],
    ]
    return s.table(["requirement", "mechanism", "evidence in this run"], rows)


# --- the report ---------------------------------------------------------------------------------------------------

def attack_section(r: Run) -> Section:
    """The membership-inference attack of simulations/attack.py run on this folder: what the models and updates
    the run released or the coordinator saw reveal about whose samples trained them."""
    from .attack import AttackError, membership_auc

    s = Section("Membership inference, measured on this run")
    try:
        result = membership_auc(r.path)
    except AttackError as err:
        return s.warning(f"Not measured: {err}.")
    s.p(f"Attack: {result['assumptions']}. {result['members']} member and {result['nonmembers']} non-member "
        "samples. The global model before round 1 never saw a device's sample: its AUC is this data's chance level.")

    def auc(x: dict) -> str:
        return "-" if not x["attacks"] else f"{x['auc']:.3f} ({x['auc_min']:.3f}-{x['auc_max']:.3f})"

    g = result["global_model"]
    if result.get("secure_aggregation"):
        s.p("This run used secure aggregation: the coordinator never held a device's DELTA (no attack on one), only "
            "each round's unmasked sum of the survivors' deltas, which it turned into the next global version. "
            "The round's sum is attacked on the run's real sums, for each round's survivors: the same numbers as "
            "the released rounds.")
    else:
        s.p("Without secure aggregation the coordinator decrypts every DELTA. The round's sum row is what secure "
            "aggregation would have left it, computed from the same DELTAs.")
    s.table(["what the attacker holds", "who holds it", "AUC (min-max)", "attacks"], [
        ["the global model before round 1 (control)", "every device", f"{g['auc_before_round_1']:.3f}", 1],
        ["the final global model", "every device, whoever gets global.ftm", f"{g['auc']:.3f}", 1],
        ["one device's DELTA", "the coordinator, without secure aggregation", auc(result["device_update"]),
         result["device_update"]["attacks"]],
        ["the round's sum", "the coordinator, under secure aggregation", auc(result["secure_aggregate"]),
         result["secure_aggregate"]["attacks"]],
        ["each released round (global model before and after)", "every device", auc(result["released_update"]),
         result["released_update"]["attacks"]]])
    return s


def write_privacy_report(run_dir: str | Path, key_file: str | Path | None = None,
                         attack: bool = False) -> tuple[Path, Path, list[str]]:
    """Write privacy_report.html and privacy_report.md into the run folder; returns their paths and the summary
    lines to print (the audit check and the capture scan). `attack`: also run the membership-inference attack
    on the run (attack_section; minutes on a large run, so asked for)."""
    from .sample_scan import CaptureError, read_capture

    r = load_run(run_dir)
    payloads = None
    if (r.path / "capture.jsonl").is_file():
        try:
            payloads = read_capture(r.path / "capture.jsonl")
        except CaptureError as err:
            raise ReportError(str(err)) from None
    audit, audit_line, audit_key_id = audit_section(r, Path(key_file) if key_file else None)
    capture, capture_line = capture_section(r, payloads)
    sections = [overview(r, audit_line, capture_line), left_devices(r, payloads), coordinator_saw(r, payloads),
                differential_privacy(r), keys_inventory(r, audit_key_id), retention(r), audit, capture,
                requirements(r, audit_line, capture_line)]
    if attack:
        sections.insert(4, attack_section(r))
    title = f"fedtiny privacy report: {r.run.get('scenario')}, {r.run.get('nodes')} devices, {len(r.rounds)} rounds"
    html, markdown = r.path / "privacy_report.html", r.path / "privacy_report.md"
    html.write_text(to_html(title, sections))
    markdown.write_text(to_markdown(title, sections))
    lines = [x["line"] for x in (audit_line, capture_line) if x]
    return html, markdown, lines
