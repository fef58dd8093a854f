"""A stand-in object store for tests: a Beam FileSystem for countfs://PATH that keeps files on the local disk
(countfs:///tmp/x is /tmp/x), has no directories, reads as Beam's GCS reader does (in chunks of CHUNK bytes from
the position read: a read outside the current chunk fetches a new one) and counts the bytes it fetches."""

import io
import os
import threading

from apache_beam.io.filesystem import CompressionTypes, FileMetadata, FileSystem
from apache_beam.io.localfilesystem import LocalFileSystem

SCHEME = "countfs"
PREFIX = f"{SCHEME}://"
GCS_CHUNK = 16 << 20  # Beam's DEFAULT_READ_BUFFER_SIZE for gs://.
_LOCK = threading.Lock()
fetched = {"bytes": 0, "chunks": 0}
settings = {"chunk": GCS_CHUNK}


def url(path):
    return PREFIX + os.path.abspath(path)


def reset(chunk=GCS_CHUNK):
    with _LOCK:
        fetched.update(bytes=0, chunks=0)
        settings["chunk"] = chunk


def _local(path):
    if not path.startswith(PREFIX):
        raise ValueError(f"{path} is not a {PREFIX} path")
    return path[len(PREFIX) :]


class _ChunkedReader(io.RawIOBase):
    """Reads like google-cloud-storage's BlobReader: a chunk from the read position at each miss."""

    def __init__(self, path):
        super().__init__()
        self.file, self.size = open(path, "rb"), os.path.getsize(path)  # noqa: SIM115 (closed by close())
        self.pos, self.chunk_start, self.chunk = 0, 0, b""

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=io.SEEK_SET):
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def readinto(self, buffer):
        wanted = min(len(buffer), self.size - self.pos)
        out = bytearray()
        while len(out) < wanted:
            if not self.chunk_start <= self.pos < self.chunk_start + len(self.chunk):
                self.file.seek(self.pos)
                self.chunk_start, self.chunk = self.pos, self.file.read(settings["chunk"])
                with _LOCK:
                    fetched["bytes"] += len(self.chunk)
                    fetched["chunks"] += 1
            start = self.pos - self.chunk_start
            piece = self.chunk[start : start + wanted - len(out)]
            out += piece
            self.pos += len(piece)
        buffer[: len(out)] = out
        return len(out)

    def close(self):
        self.file.close()
        super().close()


class CountingFileSystem(FileSystem):
    """countfs://: local files read in counted chunks."""

    def __init__(self, pipeline_options=None):
        super().__init__(pipeline_options)
        self.local = LocalFileSystem(pipeline_options)

    @classmethod
    def scheme(cls):
        return SCHEME

    def join(self, basepath, *paths):
        return basepath.rstrip("/") + "/" + "/".join(p.strip("/") for p in paths)

    def split(self, path):
        head, _, tail = path.rpartition("/")
        return head, tail

    def mkdirs(self, path):
        pass

    def has_dirs(self):
        return False

    def _list(self, dir_or_prefix):
        local = _local(dir_or_prefix)
        root = local if os.path.isdir(local) else os.path.dirname(local)
        for dirpath, _, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                if path.startswith(local):
                    yield FileMetadata(PREFIX + path, os.path.getsize(path), os.path.getmtime(path))

    def create(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        return self.local.create(_local(path), mime_type, compression_type)

    def open(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        return io.BufferedReader(_ChunkedReader(_local(path)), buffer_size=1 << 16)

    def copy(self, source_file_names, destination_file_names):
        self.local.copy([_local(p) for p in source_file_names], [_local(p) for p in destination_file_names])

    def rename(self, source_file_names, destination_file_names):
        self.local.rename([_local(p) for p in source_file_names], [_local(p) for p in destination_file_names])

    def exists(self, path):
        return os.path.isfile(_local(path))  # Objects only, as on GCS: a "folder" is a prefix, not a thing.

    def size(self, path):
        return self.local.size(_local(path))

    def last_updated(self, path):
        return self.local.last_updated(_local(path))

    def checksum(self, path):
        return self.local.checksum(_local(path))

    def metadata(self, path):
        local = _local(path)
        return FileMetadata(path, os.path.getsize(local), os.path.getmtime(local))

    def delete(self, paths):
        self.local.delete([_local(p) for p in paths])

    def report_lineage(self, path, lineage):
        pass
