"""Building the SparkSession from ``[spark]`` config. The only module that starts Spark."""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import zipfile
from pathlib import Path

from imgfeat.metadata.config import SparkConfig
from imgfeat.metadata.contracts.cv2_env import DECODER_LOGS_ENV, decoder_logs

log = logging.getLogger(__name__)



def get_spark(cfg: SparkConfig, master: str | None = None):
    """Get or create a SparkSession for ``cfg`` (``master`` overrides ``cfg.master``).

    Python workers use this interpreter, and on a non-local master our ``metadata`` package is
    shipped to executors as a zip, so a cluster needs only the third-party dependencies installed.
    """
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    builder = SparkSession.builder
    # Under spark-submit (which hands its JVM to Python through PYSPARK_GATEWAY_PORT) its --master is the
    # user's choice: a builder master, even [spark].master's default, would silently override it.
    if master or "PYSPARK_GATEWAY_PORT" not in os.environ:
        builder = builder.master(master or cfg.master)
    builder = (
        builder
        .appName(cfg.app_name)
        .config("spark.driver.memory", cfg.driver_memory)
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "2048")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.python.worker.reuse", "true")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.adaptive.enabled", "true")
        # Not spark.python.unix.domain.socket.enabled: it saves about 30 ms per Python task here, but with it
        # Spark 4.3's Python daemon prints BrokenPipe tracebacks when idle workers are reaped after a minute.
    )
    if "spark.sql.shuffle.partitions" not in cfg.conf:
        # The manifest is small tabular data: Spark's default of 200 shuffle tasks costs seconds per stage.
        builder = builder.config("spark.sql.shuffle.partitions", str(cfg.partitions or 8))
    if decoder_logs():  # executors on other machines do not inherit the driver's environment
        builder = builder.config(f"spark.executorEnv.{DECODER_LOGS_ENV}", "1")
    java_options = cfg.conf.get("spark.driver.extraJavaOptions", "")
    if "log4j2.configurationFile" not in java_options:
        java_options = f"{java_options} -Dlog4j2.configurationFile=file:{_log4j_config()}".strip()
    for key, value in {**cfg.conf, "spark.driver.extraJavaOptions": java_options}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    master = spark.sparkContext.master or ""
    if not master.startswith("local"):
        spark.sparkContext.addPyFile(_package_zip())
    log.info("Spark %s on %s (default parallelism %d)", spark.version, master, spark.sparkContext.defaultParallelism)
    return spark


_LOG4J = """\
rootLogger.level = error
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
logger.submit.name = org.apache.spark.deploy.SparkSubmit
logger.submit.level = error
logger.gateway.name = org.apache.spark.api.python.PythonGatewayServer
logger.gateway.level = error
"""
"""The driver JVM's log4j2 configuration: errors only, from its first line. With Spark's default profile it
printed its start-up banner ("Using Spark's default log4j profile", "Setting default log level") and warnings
before ``setLogLevel`` could run, even under ``-q``. Naming the two loggers Spark's shell logic reads (the
one it starts from) stops its "Setting default log level" notice."""


def _log4j_config() -> str:
    """The path of a file holding ``_LOG4J`` (written once per content, in the temp folder)."""
    import hashlib

    path = Path(tempfile.gettempdir()) / f"imgfeat-log4j2-{hashlib.sha256(_LOG4J.encode()).hexdigest()[:12]}.properties"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(_LOG4J)
        os.replace(tmp, path)
    return str(path)


def _package_zip() -> str:
    """A zip of ``imgfeat`` with its ``metadata`` sub-package (what executor tasks import), for addPyFile.

    Taken from where this process imports them (the installed wheel, or the source tree of an editable
    install), and laid out as installed: ``imgfeat/__init__.py``, ``imgfeat/metadata/...``."""
    import imgfeat
    import imgfeat.metadata

    fd, path = tempfile.mkstemp(prefix="imgfeat-pkg-", suffix=".zip")
    os.close(fd)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(imgfeat.__file__, "imgfeat/__init__.py")
        meta = Path(imgfeat.metadata.__file__).resolve().parent
        for file in meta.rglob("*.py"):
            zf.write(file, "imgfeat/metadata/" + file.relative_to(meta).as_posix())
    return path


def num_tasks(spark, cfg: SparkConfig) -> int:
    """How many tasks to split per-file work into: one per core unless ``[spark].partitions`` says
    (each Python task has a fixed cost, and files are dealt out evenly by a hash of their path)."""
    return cfg.partitions or spark.sparkContext.defaultParallelism
