"""ZConfig datatypes for ZEO configuration files, and helpers shared by runzeo.

Client side: ``%import ZEO`` then a ``<clientstorage>`` section (datatype
:class:`ClientStorageConfig`).  Server side: the ``<zeo>`` section of ``schema.xml``
(datatype :func:`zeo_section`).  ``<ssl>`` is one section type used by both.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

import ZConfig
import ZODB.config

from . import address

SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "schema.xml")
ZEOCTL_SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "zeoctl.xml")

_schemas: dict[str, Any] = {}


def load_schema(path: str = SCHEMA_PATH):
    """The parsed ZConfig schema at ``path`` (cached)."""
    schema = _schemas.get(path)
    if schema is None:
        schema = _schemas[path] = ZConfig.loadSchema(path)
    return schema


def _password_function(name: str | None):
    if not name:
        return None
    return ZODB.config.importable_name(name)


def ssl_section(section: Any) -> Any:
    """Datatype of ``<ssl>``: checked when its owner (server or client) builds a context."""
    return section


def server_ssl_context(section: Any) -> ssl.SSLContext:
    """The TLS context of a server ``<ssl>`` section: clients must present a certificate
    that verifies against ``authenticate`` (a CA file, a CA directory, or ``DYNAMIC`` for
    the system CAs)."""
    auth = section.authenticate
    if not auth:
        raise ZConfig.DataConversionError(
            ValueError("the <ssl> section of <zeo> needs an 'authenticate' key"),
            section, ("<ssl>", -1, -1))
    if auth == "DYNAMIC":
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    elif os.path.isdir(auth):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, capath=auth)
    else:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=auth)
    context.load_cert_chain(section.certificate, section.key,
                            _password_function(section.password_function))
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    if context.cert_store_stats().get("crl"):
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    context.check_hostname = False
    return context


def client_ssl_context(section: Any) -> tuple[ssl.SSLContext, str | None]:
    """``(context, server_hostname)`` for a client ``<ssl>`` section."""
    auth = section.authenticate
    if not auth:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    elif os.path.isdir(auth):
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, capath=auth)
    else:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=auth)
    context.load_cert_chain(section.certificate, section.key,
                            _password_function(section.password_function))
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    check = section.check_hostname
    context.check_hostname = True if check is None else bool(check)
    return context, section.server_hostname


def zeo_section(section: Any) -> Any:
    """Datatype of the server's ``<zeo>``: adds ``addresses`` (our address forms) and
    ``ssl_context`` (an :class:`ssl.SSLContext` or None); the other keys stay as parsed."""
    section.addresses = [address.from_zconfig(a) for a in section.address]
    section.ssl_context = server_ssl_context(section.ssl) if section.ssl is not None else None
    if getattr(section, "authorization", None) is not None and section.ssl is None:
        raise ZConfig.DataConversionError(
            ValueError("<authorization> needs an <ssl> section: it names client certificates"),
            section, ("<authorization>", -1, -1))
    return section


def storage_id(storage_config: Any) -> str:
    """The id a storage section is served under: its section name, or ``'1'``."""
    return storage_config.name or "1"


class ClientStorageConfig(ZODB.config.BaseConfig):
    """Datatype of ``<clientstorage>``: ``open()`` returns a connected ClientStorage."""

    def client_arguments(self) -> tuple[list, dict[str, Any]]:
        """``(addresses, keyword arguments)`` for ClientStorage, from the section."""
        c = self.config
        addresses = [address.from_zconfig(a) for a in c.server]
        kw: dict[str, Any] = dict(
            storage=c.storage,
            cache_size=c.cache_size,
            name=c.name,
            blob_dir=c.blob_dir,
            shared_blob_dir=c.shared_blob_dir,
            read_only=c.read_only,
            read_only_fallback=c.read_only_fallback,
            server_sync=c.server_sync,
            wait_timeout=c.wait_timeout,
            address_policy=c.address_policy,
        )
        if c.cache_path is not None:
            kw["cache"] = c.cache_path
        if c.blob_cache_size is not None:
            kw["blob_cache_size"] = c.blob_cache_size
        if c.blob_cache_size_check is not None:
            kw["blob_cache_size_check"] = c.blob_cache_size_check
        if c.client_label is not None:
            kw["client_label"] = c.client_label
        if c.ssl is not None:
            kw["ssl"], kw["ssl_server_hostname"] = client_ssl_context(c.ssl)
        return addresses, kw

    def open(self):
        from ZEO.ClientStorage import ClientStorage

        addresses, kw = self.client_arguments()
        return ClientStorage(addresses, **kw)


def storage_open_paths(section: Any):
    """Yield the path of every FileStorage a storage section would open (nested ones too:
    ``<blobstorage>``, ``<demostorage>``...), so runzeo can report who holds its lock."""
    if section is None:
        return
    config = getattr(section, "config", section)  # a ZODB.config factory or a section
    get_type = getattr(config, "getSectionType", None)
    if get_type is None:
        return
    if get_type() == "filestorage":
        yield config.path
    for value in vars(config).values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, ZODB.config.BaseConfig) or hasattr(item, "getSectionType"):
                yield from storage_open_paths(item)
