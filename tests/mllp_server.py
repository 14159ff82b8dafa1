"""A real MLLP listener for tests: a threaded TCP (optionally TLS) server that stands in for a RIS or interface
engine. Each message is parsed with python-hl7, its structure validated against HL7 v2.5.1 with hl7apy, stored,
and answered as `mode` says.

    with MllpServer() as ris:        # answers AA
        ris.port; ris.messages; ris.mode = "AE"
"""

from __future__ import annotations

import re
import socket
import socketserver
import ssl
import threading
from pathlib import Path
from typing import Literal

import hl7
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from hl7apy.validation import Validator

START, END = b"\x0b", b"\x1c\x0d"
Mode = Literal["AA", "AE", "AR", "CA", "CE", "CR", "drop", "hang", "wrong-id"]


def validate(text: str) -> str | None:
    """None when `text` is a structurally valid HL7 v2.5.1 message (hl7apy, strict), else the reason."""
    try:
        message = parse_message(text.replace("\n", "\r"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        Validator.validate(message)
    except Exception as exc:  # hl7apy raises several unrelated types for one bad message
        return f"{type(exc).__name__}: {exc}"
    return None


class MllpServer:
    """An MLLP listener on 127.0.0.1 (a free port). `mode`: an acknowledgment code to answer (AA, AE, AR, CA, CE,
    CR), `drop` (close without an ACK), `hang` (never answer), `wrong-id` (AA for another control id). A message
    that fails validation is answered AE with the reason. `tls`: {"server", "server_key"[, "ca"]} PEM paths; with a
    CA, clients must present a certificate it signed."""

    def __init__(self, mode: Mode = "AA", tls: dict[str, Path] | None = None) -> None:
        self.mode: Mode = mode
        self.raw: list[str] = []  # the messages as received (ER7)
        self.messages: list[hl7.Message] = []
        self.invalid: list[str] = []  # validation failures
        self.connections = 0
        self._release = threading.Event()
        context = None
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls["server"]), str(tls["server_key"]))
            if tls.get("ca"):
                context.load_verify_locations(str(tls["ca"]))
                context.verify_mode = ssl.CERT_REQUIRED
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer.connections += 1
                sock = self.request
                try:
                    if isinstance(sock, ssl.SSLSocket):
                        sock.do_handshake()
                    buffer = b""
                    while True:
                        chunk = sock.recv(65536)
                        if not chunk:
                            return
                        buffer += chunk
                        while END in buffer:
                            frame, buffer = buffer.split(END, 1)
                            reply = outer._answer(frame[frame.find(START) + 1:].decode("utf-8"))
                            if reply is None:
                                return
                            sock.sendall(START + reply.encode("utf-8") + END)
                except (OSError, ssl.SSLError):
                    return  # a client that failed the TLS handshake or went away

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

            def get_request(self) -> tuple[socket.socket, object]:
                sock, addr = self.socket.accept()
                if context is not None:
                    sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                return sock, addr

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="mllp-server", daemon=True)

    def _answer(self, text: str) -> str | None:
        """Store one message and return the ACK to send (None: close without one)."""
        self.raw.append(text)
        message = hl7.parse(text)
        self.messages.append(message)
        problem = validate(text)
        if problem:
            self.invalid.append(problem)
        if self.mode == "drop":
            return None
        if self.mode == "hang":
            self._release.wait()
            return None
        code = "AE" if problem else "AA" if self.mode == "wrong-id" else self.mode
        ack = message.create_ack(code, message_id=f"ACK{len(self.raw)}", application="TESTRIS", facility="HOSPITAL")
        if self.mode == "wrong-id":
            ack.segment("MSA").assign_field("NOT-" + str(message["MSH.F10"]), 2)
        if code != "AA":
            reason = re.sub(r"[|^&~\\\s]+", " ", problem or f"test listener answers {code}")[:80]
            ack.segment("MSA").assign_field(reason, 3)
            return str(ack) + f"ERR|||207^Application internal error^HL70357|E||||{reason}\r"
        return str(ack)

    def __enter__(self) -> MllpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
