# Sourced by .ci/run (and tests/test_suite_setup.py): each CI run's work folder, and the
# removal of those that killed runs left behind.
#
# A run keeps its virtual environments, pip's and pytest's temporary files and the Inductor
# cache in one folder, meprop-ci.XXXXXX under $TMPDIR, removed by its EXIT trap. A run that
# was killed (SIGKILL; a machine's session ending under it) never reaches that trap, and
# its folder holds up to three virtual environments, about 5 GB each. Each folder names its
# run in a file `owner`: the pid and start time of the shell running .ci/run. A folder
# whose process is gone is removed by the next run; one without an owner file (an older
# .ci/run) once it has been left untouched for 3 hours (a run takes at most 90 minutes).
# Where /proc is missing nothing is removed.

ci_proc_start() {  # ci_proc_start PID: its start time in clock ticks since boot; empty when it is gone
    { awk '{ sub(/^.*\) /, ""); print $20 }' "/proc/$1/stat" 2>/dev/null; } || true
}

ci_remove_stale_work_dirs() {  # ci_remove_stale_work_dirs ROOT
    local old pid pid_start
    [ -r "/proc/$$/stat" ] || return 0
    for old in "$1"/meprop-ci.*; do
        [ -d "$old" ] || continue
        if [ -f "$old/owner" ]; then
            pid= pid_start=
            read -r pid pid_start < "$old/owner" || true
            if [ -n "$pid" ] && [ -n "$pid_start" ] && [ "$(ci_proc_start "$pid")" = "$pid_start" ]; then
                continue  # its run is still going
            fi
        elif [ -n "$(find "$old" -maxdepth 0 -mmin -180)" ]; then
            continue
        fi
        echo "   removing $old ($(du -sh "$old" 2>/dev/null | cut -f1)), left by a CI run that was killed"
        rm -rf "$old" || echo "   (could not remove all of $old)"
    done
}

ci_new_work_dir() {  # ci_new_work_dir ROOT: makes and prints a new work folder owned by this shell
    local work
    work=$(mktemp -d "$1/meprop-ci.XXXXXX")
    echo "$$ $(ci_proc_start $$)" > "$work/owner"
    echo "$work"
}
