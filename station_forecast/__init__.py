"""The code the four stage scripts share, in layers: a module imports only from its own layer or the ones
below it, and no imports go round in a circle (tests/test_shared.py checks both).

==========  ================================  =========================================================
layer       modules                           what they are for
==========  ================================  =========================================================
base        errors, files, flags, steps,      exit codes, the checks every input file passes, the
            units, params                     flags a reading can carry, time steps, the units readings
                                              are written in, the parameters
runtime     runtime, stopping                 threads, memory, progress, lazy imports, the thread pool;
                                              stop signals and the check before every commit
                                              (standard library only)
storage     storage, station_files,           where every artifact lives, how it is written and read
            manifest, registry, spill         safely, the one reader of station files, what each stage
                                              ran with, accepted model sets, tables kept a block at a
                                              time (on disk when large)
compute     compute                           where chunks of work run: this process's threads or a
                                              Dask cluster
domain      importing, quality_control,       a user's own files made into the stages' station files,
            features, report, scoring         the detector, the features and the forecaster, the
                                              report's tables and figures, how forecasts, intervals
                                              and the detector are scored
entry       cli                               how a stage runs from the command line: the lock,
                                              one clear line on failure
==========  ================================  =========================================================

The stage scripts sit above all of these, beside this folder; tools (``tools/``) that are not stages
sit above them and are never imported by a stage.
"""

LAYERS = {
    "base": ["errors", "files", "flags", "steps", "units", "params"],
    "runtime": ["runtime", "stopping"],
    "storage": ["storage", "station_files", "manifest", "registry", "spill"],
    "compute": ["compute"],
    "domain": ["importing", "quality_control", "features", "report", "scoring"],
    "entry": ["cli"],
}
