"""blockdev-create through the real qemu.qmp client against `blockengine serve`: the
management flow (file -> blockdev-add -> qcow2/luks on the node -> blockdev-add -> use),
the job's event sequence and every error, with the texts qemu-storage-daemon 7.2 gives
(the same cases run side by side against it in tests/qmp/test_side_by_side.py)."""
from __future__ import annotations

import asyncio
import json
import subprocess

import pytest
from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient

from tests.qmp.test_server import Serve, run
from tests.tooling import require_tool

MiB = 1 << 20
SUCCESS = ["created", "running", "waiting", "pending", "concluded"]
FAILURE = ["created", "running", "aborting", "concluded"]


@pytest.fixture
def serve(tmp_path):
    s = Serve(tmp_path, monitors=1, extra=("--object", "secret,id=sec0,data=hunter2"))
    yield s
    s.stop()


class Session:
    """A qemu.qmp client that follows the jobs' JOB_STATUS_CHANGE events."""

    def __init__(self, qmp: QMPClient, listener: EventListener):
        self.qmp, self.listener = qmp, listener

    async def execute(self, name: str, args: dict | None = None):
        return await self.qmp.execute(name, args)

    async def error(self, name: str, args: dict) -> str:
        with pytest.raises(ExecuteError) as e:
            await self.qmp.execute(name, args)
        assert e.value.error_class == "GenericError"
        return e.value.error.error.desc

    async def create(self, job_id: str, options: dict) -> tuple[list[str], dict]:
        """blockdev-create and wait for the job to conclude; dismiss it.  Returns the
        statuses it went through and its query-jobs entry when concluded."""
        await self.qmp.execute("blockdev-create", {"job-id": job_id, "options": options})
        statuses = []
        while statuses[-1:] != ["concluded"]:
            event = await self.listener.get()
            assert event["data"]["id"] == job_id
            statuses.append(event["data"]["status"])
        [info] = [j for j in await self.qmp.execute("query-jobs") if j["id"] == job_id]
        await self.qmp.execute("job-dismiss", {"id": job_id})
        assert (await self.listener.get())["data"] == {"status": "null", "id": job_id}
        assert await self.qmp.execute("query-jobs") == []
        return statuses, info

    async def create_ok(self, job_id: str, options: dict) -> None:
        statuses, info = await self.create(job_id, options)
        assert info == {"id": job_id, "type": "create", "status": "concluded",
                        "current-progress": 1, "total-progress": 1}
        assert statuses == SUCCESS

    async def create_fails(self, job_id: str, options: dict) -> str:
        statuses, info = await self.create(job_id, options)
        assert statuses == FAILURE
        assert (info["current-progress"], info["total-progress"]) == (1, 1)
        return info["error"]


async def connect(qmp: QMPClient, path: str) -> None:
    """Connect, retrying while the socket exists but does not listen yet."""
    for attempt in range(100):
        try:
            await qmp.connect(path)
            return
        except ConnectError:
            if attempt == 99:
                raise
            await asyncio.sleep(0.05)


def session(serve, test):
    async def go():
        qmp = QMPClient("create-test")
        listener = EventListener("JOB_STATUS_CHANGE")
        qmp.register_listener(listener)
        await connect(qmp, serve.socks[0])
        try:
            await test(Session(qmp, listener))
        finally:
            await qmp.disconnect()
    run(go())


def img_info(path) -> dict:
    out = subprocess.run([require_tool("qemu-img"), "info", "-U", "--output=json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_file_then_qcow2_on_the_node_then_use_it(serve, tmp_path):
    image, base = tmp_path / "disk.qcow2", tmp_path / "base.qcow2"
    copy = tmp_path / "copy.qcow2"

    async def test(s: Session):
        await s.create_ok("mkbase", {"driver": "file", "filename": str(base), "size": 0})
        await s.execute("blockdev-add", {"driver": "file", "filename": str(base),
                                         "node-name": "base-file"})
        await s.create_ok("fmtbase", {"driver": "qcow2", "file": "base-file",
                                      "size": 4 * MiB})
        # data in the base, written by qemu-io (an unused node holds no locks)
        r = subprocess.run([require_tool("qemu-io"), "-f", "qcow2", "-c",
                            "write -P 0x5a 1M 64k", str(base)], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        await s.create_ok("mkfile", {"driver": "file", "filename": str(image), "size": 0})
        await s.execute("blockdev-add", {"driver": "file", "filename": str(image),
                                         "node-name": "disk-file"})
        await s.create_ok("fmt", {"driver": "qcow2", "file": "disk-file", "size": 4 * MiB,
                                  "cluster-size": 4096, "backing-file": str(base),
                                  "backing-fmt": "qcow2", "lazy-refcounts": True,
                                  "refcount-bits": 8})
        # the new image is usable at once: open it with its backing chain and grow it
        await s.execute("blockdev-add", {"driver": "qcow2", "node-name": "disk",
                                         "file": "disk-file"})
        nodes = {n["node-name"]: n for n in await s.execute("query-named-block-nodes")}
        assert nodes["disk"]["backing_file"] == str(base)
        assert nodes["disk"]["image"]["backing-image"]["format"] == "qcow2"
        await s.execute("block_resize", {"node-name": "disk", "size": 8 * MiB})
        # and copy it, backing data included, to a second image created the same way
        await s.create_ok("mkcopy", {"driver": "file", "filename": str(copy), "size": 0})
        await s.create_ok("fmtcopy", {"driver": "qcow2", "size": 8 * MiB,
                                      "file": {"driver": "file", "filename": str(copy)}})
        await s.execute("blockdev-add", {"driver": "qcow2", "node-name": "copy",
                                         "file": {"driver": "file", "filename": str(copy)}})
        await s.execute("blockdev-backup", {"job-id": "bk", "device": "disk",
                                            "target": "copy", "sync": "full"})
        statuses = []
        while statuses[-1:] != ["null"]:
            event = await s.listener.get()
            assert event["data"]["id"] == "bk"
            statuses.append(event["data"]["status"])
        assert statuses == SUCCESS + ["null"]
        await s.execute("blockdev-del", {"node-name": "copy"})
        await s.execute("blockdev-del", {"node-name": "disk"})
    session(serve, test)

    info = img_info(image)
    assert (info["format"], info["virtual-size"], info["cluster-size"]) == (
        "qcow2", 8 * MiB, 4096)
    assert (info["backing-filename"], info["backing-filename-format"]) == (str(base), "qcow2")
    data = info["format-specific"]["data"]
    assert (data["compat"], data["lazy-refcounts"], data["refcount-bits"]) == ("1.1", True, 8)
    check = subprocess.run([require_tool("qemu-img"), "check", "-U", str(image)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert img_info(base)["virtual-size"] == 4 * MiB
    r = subprocess.run([require_tool("qemu-io"), "-r", "-f", "qcow2", "-c",
                        "read -P 0x5a 1M 64k", "-c", "read -P 0 0 1M", "-c",
                        "read -P 0 4M 4M", str(copy)], capture_output=True, text=True)
    assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout


def test_qcow2_is_byte_identical_to_qemu_img_create(serve, tmp_path):
    """qcow2 blockdev-create on an empty file lays out what qemu-img create does."""
    ours, ref = tmp_path / "ours.qcow2", tmp_path / "ref.qcow2"
    subprocess.run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", "-o",
                    "cluster_size=16384,extended_l2=on,compat=1.1", str(ref), "3M"],
                   check=True)

    async def test(s: Session):
        await s.create_ok("f", {"driver": "file", "filename": str(ours), "size": 0})
        await s.execute("blockdev-add", {"driver": "file", "filename": str(ours),
                                         "node-name": "f0"})
        await s.create_ok("q", {"driver": "qcow2", "file": "f0", "size": 3 * MiB,
                                "cluster-size": 16384, "extended-l2": True,
                                "version": "v3"})
    session(serve, test)
    assert ours.read_bytes() == ref.read_bytes()


def test_luks_and_encrypted_qcow2_with_the_secret_object(serve, tmp_path):
    luks, enc = tmp_path / "disk.luks", tmp_path / "enc.qcow2"

    async def test(s: Session):
        for job, path in (("a", luks), ("b", enc)):
            await s.create_ok(job, {"driver": "file", "filename": str(path), "size": 0})
        await s.execute("blockdev-add", {"driver": "file", "filename": str(luks),
                                         "node-name": "luks-file"})
        await s.create_ok("c", {"driver": "luks", "file": "luks-file", "size": 2 * MiB,
                                "key-secret": "sec0", "iter-time": 10,
                                "cipher-alg": "aes-128", "hash-alg": "sha1"})
        await s.execute("blockdev-add", {"driver": "luks", "node-name": "luks",
                                         "file": "luks-file", "key-secret": "sec0"})
        await s.create_ok("d", {"driver": "qcow2", "size": 2 * MiB,
                                "file": {"driver": "file", "filename": str(enc)},
                                "encrypt": {"format": "luks", "key-secret": "sec0",
                                            "iter-time": 10}})
    session(serve, test)

    info = img_info(luks)
    assert (info["format"], info["virtual-size"], info["encrypted"]) == ("luks", 2 * MiB, True)
    spec = info["format-specific"]["data"]
    assert (spec["cipher-alg"], spec["hash-alg"]) == ("aes-128", "sha1")
    info = img_info(enc)
    assert (info["format"], info["encrypted"]) == ("qcow2", True)
    assert info["format-specific"]["data"]["encrypt"]["format"] == "luks"
    # qemu-io unlocks both with the passphrase only (the LUKS payload was never written:
    # it decrypts to noise; the qcow2 clusters are unallocated: zeros)
    for opts, read in ((f"driver=luks,key-secret=s,file.filename={luks}", "read 0 2M"),
                       (f"driver=qcow2,encrypt.key-secret=s,file.filename={enc}",
                        "read -P 0 0 2M")):
        for password, ok in (("hunter2", True), ("hunter3", False)):
            r = subprocess.run([require_tool("qemu-io"), "-U", "--object",
                                f"secret,id=s,data={password}", "-r", "--image-opts", opts,
                                "-c", read], capture_output=True, text=True)
            assert (r.returncode == 0 and "read 2097152/2097152" in r.stdout) == ok, (
                r.stdout + r.stderr)
            if not ok:
                assert "Invalid password, cannot unlock any keyslot" in r.stderr


# (options, the error QEMU 7.2 gives right away) -- recorded with qemu-storage-daemon
COMMAND_ERRORS = [
    ({"driver": "raw", "file": "f0"}, "Parameter 'options.file' is unexpected"),
    ({"filename": "x", "size": 0}, "Parameter 'options.driver' is missing"),
    ({"driver": "file", "filename": "x"}, "Parameter 'options.size' is missing"),
    ({"driver": "file", "filename": "x", "size": 0, "bogus": 1},
     "Parameter 'options.bogus' is unexpected"),
    ({"driver": "qcow2", "file": "f0", "size": 0, "version": "v4"},
     "Parameter 'version' does not accept value 'v4'"),
    ({"driver": "null-co"}, "Driver does not support blockdev-create"),
    ({"driver": "raw"}, "Driver does not support blockdev-create"),
    ({"driver": "vdi", "file": "f0", "size": 0},
     "Block driver 'vdi' not found or not supported"),
]


@pytest.mark.parametrize("options,message", COMMAND_ERRORS)
def test_command_errors(serve, options, message):
    async def test(s: Session):
        assert await s.error("blockdev-create", {"job-id": "j", "options": options}) == message
        assert await s.execute("query-jobs") == []
    session(serve, test)


# (options, the error the concluded job reports in query-jobs) -- as qemu-storage-daemon
JOB_ERRORS = [
    ({"driver": "qcow2", "file": "nope", "size": MiB},
     "Cannot find device='nope' nor node-name='nope'"),
    ({"driver": "qcow2", "file": "f0", "size": 1}, "Image size must be a multiple of 512 bytes"),
    ({"driver": "qcow2", "file": "f0", "size": MiB, "cluster-size": 1000},
     "Cluster size must be a power of two between 512 and 2048k"),
    ({"driver": "qcow2", "file": "f0", "size": MiB, "version": "v2", "lazy-refcounts": True},
     "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 "
     "or greater)"),
    ({"driver": "qcow2", "file": "f0", "size": MiB, "refcount-bits": 3},
     "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"driver": "qcow2", "file": "f0", "size": MiB, "backing-fmt": "qcow2"},
     "Backing format cannot be used without backing file"),
    ({"driver": "qcow2", "file": "f0", "size": MiB, "data-file-raw": True},
     "data-file-raw requires data-file"),
    ({"driver": "qcow2", "file": "f0", "size": MiB, "backing-file": "b",
      "preallocation": "metadata"},
     "Backing file and preallocation can only be used at the same time if extended_l2 is on"),
    ({"driver": "qcow2", "file": "f0", "size": MiB, "extended-l2": True, "cluster-size": 4096},
     "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"),
    ({"driver": "qcow2", "file": "f0", "size": MiB, "compression-type": "zstd",
      "version": "v2"},
     "Non-zlib compression type is only supported with compatibility level 1.1 and above "
     "(use version=v3 or greater)"),
    ({"driver": "qcow2", "file": "f0", "size": MiB, "data-file": "nosuch"},
     "Cannot find device='nosuch' nor node-name='nosuch'"),
    ({"driver": "qcow2", "file": "f0", "size": MiB, "encrypt": {"format": "luks"}},
     "Parameter 'encrypt.key-secret' is required for cipher"),
    ({"driver": "qcow2", "file": "f0", "size": MiB,
      "encrypt": {"format": "luks", "key-secret": "nosuch"}}, "No secret with id 'nosuch'"),
    ({"driver": "qcow2", "file": "ro", "size": MiB}, "Block node is read-only"),
    ({"driver": "luks", "file": "f0", "size": MiB}, "Parameter 'key-secret' is required for cipher"),
    ({"driver": "luks", "file": "f0", "size": MiB, "key-secret": "nosuch"},
     "No secret with id 'nosuch'"),
    ({"driver": "luks", "file": "ro", "size": MiB, "key-secret": "sec0"},
     "Block node is read-only"),
    ({"driver": "vmdk", "file": "f0", "size": MiB + 1},
     "Image size must be a multiple of 512 bytes"),
    ({"driver": "vmdk", "file": "f0", "size": MiB, "subformat": "monolithicFlat",
      "zeroed-grain": True}, "Flat image can't enable zeroed grain"),
    ({"driver": "vmdk", "file": "f0", "size": MiB, "subformat": "twoGbMaxExtentFlat",
      "backing-file": "b.vmdk"}, "Flat image can't have backing file"),
    ({"driver": "file", "filename": "/nonexistent/x", "size": 1},
     "Could not create '/nonexistent/x': No such file or directory"),
    ({"driver": "file", "filename": "DIR/neg", "size": -1}, "Could not resize file: Invalid argument"),
    ({"driver": "file", "filename": "DIR/meta", "size": MiB, "preallocation": "metadata"},
     "Unsupported preallocation mode: metadata"),
    ({"driver": "qcow2", "file": {"driver": "file", "filename": "DIR/missing"}, "size": MiB},
     "Could not open 'DIR/missing': No such file or directory"),
    ({"driver": "qcow2", "file": {"driver": "file", "filename": "DIR/raw.img"}, "size": MiB,
      "data-file": "nosuch"}, "Cannot find device='nosuch' nor node-name='nosuch'"),
]


@pytest.mark.parametrize("options,message", JOB_ERRORS)
def test_job_errors(serve, tmp_path, options, message):
    raw = tmp_path / "raw.img"
    raw.write_bytes(bytes(4096))

    def here(value):
        return json.loads(json.dumps(value).replace("DIR", str(tmp_path)))

    async def test(s: Session):
        await s.execute("blockdev-add", {"driver": "file", "filename": str(raw),
                                         "node-name": "f0"})
        await s.execute("blockdev-add", {"driver": "file", "filename": str(raw),
                                         "node-name": "ro", "read-only": True})
        assert await s.create_fails("j", here(options)) == here(message)
        # no node left behind; the file node is unchanged and still usable
        nodes = await s.execute("query-named-block-nodes")
        assert sorted(n["node-name"] for n in nodes) == ["f0", "ro"]
        assert await s.execute("query-block-jobs") == []
        await s.execute("blockdev-del", {"node-name": "ro"})
        await s.execute("blockdev-del", {"node-name": "f0"})
    session(serve, test)
    assert raw.read_bytes() == bytes(4096)


def test_job_ids_and_job_commands(serve, tmp_path):
    target = str(tmp_path / "t.img")

    async def test(s: Session):
        options = {"driver": "file", "filename": target, "size": 0}
        assert await s.error("blockdev-create", {"job-id": "1bad", "options": options}) == (
            "Invalid job ID '1bad'")
        assert await s.error("blockdev-create", {"options": options}) == (
            "Parameter 'job-id' is missing")
        await s.execute("blockdev-create", {"job-id": "dup", "options": options})
        assert await s.error("blockdev-create", {"job-id": "dup", "options": options}) == (
            "Job ID 'dup' already in use")
        while (await s.execute("query-jobs"))[0]["status"] != "concluded":
            await s.listener.get()
        # a plain job: invisible to the block-job commands, dismissed by hand
        assert await s.execute("query-block-jobs") == []
        for name, args in (("block-job-cancel", {"device": "dup"}),
                           ("block-job-dismiss", {"id": "dup"})):
            with pytest.raises(ExecuteError) as e:
                await s.execute(name, args)
            assert (e.value.error_class, e.value.error.error.desc) == (
                "DeviceNotActive", "Block job 'dup' not found")
        assert await s.error("job-cancel", {"id": "dup"}) == (
            "Job 'dup' in state 'concluded' cannot accept command verb 'cancel'")
        # jobs are listed newest first, as QEMU prepends them
        await s.execute("blockdev-create", {"job-id": "two", "options": options})
        while (await s.execute("query-jobs"))[0]["status"] != "concluded":
            await s.listener.get()
        assert [j["id"] for j in await s.execute("query-jobs")] == ["two", "dup"]
        await s.execute("job-dismiss", {"id": "two"})
        await s.execute("job-dismiss", {"id": "dup"})
        assert await s.error("job-dismiss", {"id": "dup"}) == "Job not found"
    session(serve, test)


def test_vmdk_subformats(serve, tmp_path):
    def path(name):
        return str(tmp_path / name)

    async def test(s: Session):
        for name in ("mono.vmdk", "stream.vmdk", "flat.vmdk", "flat-ext.vmdk", "split.vmdk",
                     "s1.vmdk", "s2.vmdk"):
            await s.create_ok("mk", {"driver": "file", "filename": path(name), "size": 0})
        for name, node in (("mono.vmdk", "mono"), ("stream.vmdk", "stream"),
                           ("flat.vmdk", "flat"), ("flat-ext.vmdk", "flat-ext")):
            await s.execute("blockdev-add", {"driver": "file", "node-name": node,
                                             "filename": path(name)})
        await s.create_ok("a", {"driver": "vmdk", "file": "stream", "size": 3 * MiB,
                                "subformat": "streamOptimized"})
        await s.create_ok("b", {"driver": "vmdk", "file": "mono", "size": 3 * MiB,
                                "zeroed-grain": True, "backing-file": "stream.vmdk",
                                "adapter-type": "buslogic"})
        await s.create_ok("c", {"driver": "vmdk", "file": "flat", "size": 3 * MiB,
                                "subformat": "monolithicFlat", "extents": ["flat-ext"]})
        # split extents of 2 GiB each: two extents for 3 GiB, opened inline
        await s.create_ok("d", {"driver": "vmdk", "size": 3 << 30,
                                "file": {"driver": "file", "filename": path("split.vmdk")},
                                "subformat": "twoGbMaxExtentSparse",
                                "extents": [{"driver": "file", "filename": path(n)}
                                            for n in ("s1.vmdk", "s2.vmdk")]})
        # the descriptor node is formatted first, then the missing extent is found
        assert await s.create_fails("e", {"driver": "vmdk", "file": "flat-ext",
                                          "size": MiB, "subformat": "monolithicFlat"}) == (
            "Extent [0] not specified")
        assert await s.create_fails("f", {"driver": "vmdk", "file": "flat-ext",
                                          "size": MiB, "extents": ["flat"]}) == (
            "List of extents contains unused extents")
        await s.execute("blockdev-add", {"driver": "vmdk", "node-name": "disk",
                                         "file": "mono"})
        nodes = {n["node-name"]: n for n in await s.execute("query-named-block-nodes")}
        assert nodes["disk"]["backing_file"] == "stream.vmdk"
    session(serve, test)

    info = img_info(path("mono.vmdk"))
    assert (info["format"], info["virtual-size"], info["backing-filename"]) == (
        "vmdk", 3 * MiB, "stream.vmdk")
    assert info["format-specific"]["data"]["create-type"] == "monolithicSparse"
    info = img_info(path("split.vmdk"))
    assert info["virtual-size"] == 3 << 30
    assert [e["filename"] for e in info["format-specific"]["data"]["extents"]] == [
        path("s1.vmdk"), path("s2.vmdk")]
    assert [e["virtual-size"] for e in info["format-specific"]["data"]["extents"]] == [
        2 << 30, 1 << 30]
    assert img_info(path("flat.vmdk"))["format-specific"]["data"]["create-type"] == (
        "monolithicFlat")
    for name in ("mono.vmdk", "stream.vmdk", "flat.vmdk", "split.vmdk"):
        check = subprocess.run([require_tool("qemu-img"), "check", "-U", path(name)],
                               capture_output=True, text=True)
        assert check.returncode == 0, (name, check.stdout + check.stderr)
    descriptor = (tmp_path / "mono.vmdk").read_bytes()[512:1024]
    assert b'ddb.adapterType = "buslogic"' in descriptor
    assert b'parentFileNameHint="stream.vmdk"' in descriptor
