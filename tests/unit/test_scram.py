"""The SCRAM salted password `ragbus tenants` sends to the cluster (AlterUserScramCredentials)
is RFC 5802's Hi(): checked against published vectors, so a credential made here verifies the
same proof a Kafka client computes at login."""

from __future__ import annotations

import base64
import hashlib
import hmac

from infra.kafka.security import salted_password


def test_rfc7677_scram_sha256_exchange() -> None:
    """RFC 7677 section 3: user "user", password "pencil"; the client proof and the server
    signature follow from the salted password alone."""
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    salted = salted_password("pencil", salt, 4096, "SCRAM-SHA-256")
    nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    auth = f"n=user,r=rOprNGfwEbeRWgbNEkqO,r={nonce},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r={nonce}"
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    signature = hmac.new(hashlib.sha256(client_key).digest(), auth.encode(), hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    assert base64.b64encode(proof).decode() == "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    server_sig = hmac.new(server_key, auth.encode(), hashlib.sha256).digest()
    assert base64.b64encode(server_sig).decode() == "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_scram_sha512_is_pbkdf2_hmac_sha512_with_a_64_byte_key() -> None:
    """The published PBKDF2-HMAC-SHA512 vector (P="password", S="salt", c=1, dkLen=64)."""
    salted = salted_password("password", b"salt", 1, "SCRAM-SHA-512")
    assert salted.hex() == (
        "867f70cf1ade02cff3752599a3a53dc4af34c7a669815ae5d513554e1c8cf252"
        "c02d470a285a0501bad999bfe943c08f050235d7d68b1da55e63f73b60a57fce"
    )
