/*
 * A tour of the qcow2kit C ABI: create an image, write and read it back
 * (plain and vectored), query block status, zero, discard, resize, reopen
 * read-only, and watch a corruption event.
 *
 * Build (from the repository root, after `cargo build -p qcow2kit-capi`):
 *   cc -Icapi/include capi/examples/c/demo.c -Ltarget/debug -lqcow2kit_c \
 *      -Wl,-rpath,$PWD/target/debug -o demo
 * Run:
 *   ./demo DIR [CORRUPT_IMAGE]
 * DIR is a scratch directory; CORRUPT_IMAGE, when given, is an image whose
 * first L2 entry points at metadata, so that writing guest offset 0 must be
 * refused (tests/capi.rs makes one).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2kit.h"

#define MiB (1024u * 1024u)

static int failures;

/* Prints "what: ok" or "what: error CODE (MESSAGE)" and counts failures
 * that were not expected. */
static int report(const char *what, int rc, int expect) {
    if (rc == 0)
        printf("%s: ok\n", what);
    else
        printf("%s: error %d (%s)\n", what, rc, qcow2kit_last_error());
    if (rc != expect) {
        printf("UNEXPECTED: %s returned %d, expected %d\n", what, rc, expect);
        failures++;
    }
    return rc;
}

static void on_event(const qcow2kit_event *ev, void *user_data) {
    int *count = user_data;
    (*count)++;
    if (ev->kind == QCOW2KIT_EVENT_IMAGE_CORRUPTED)
        printf("event: image corrupted node=%s fatal=%d offset=%s0x%llx "
               "size=%llu msg=%s\n",
               ev->node_name ? ev->node_name : "(none)", ev->fatal,
               ev->has_offset ? "" : "?", (unsigned long long)ev->offset,
               (unsigned long long)ev->size, ev->msg);
    else if (ev->kind == QCOW2KIT_EVENT_IO_ERROR)
        printf("event: I/O error op=%d action=%d nospace=%d reason=%s\n",
               ev->operation, ev->action, ev->nospace, ev->msg);
}

static const char *kind_name(int kind) {
    switch (kind) {
    case QCOW2KIT_EXTENT_DATA: return "data";
    case QCOW2KIT_EXTENT_ZERO: return "zero";
    case QCOW2KIT_EXTENT_UNALLOCATED: return "unallocated";
    case QCOW2KIT_EXTENT_COMPRESSED: return "compressed";
    default: return "?";
    }
}

static void status(qcow2kit_image *img, uint64_t off, uint64_t len) {
    qcow2kit_status st;
    if (report("block_status", qcow2kit_block_status(img, off, len, &st), 0) == 0)
        printf("status %llu+%llu: len=%llu kind=%s allocated=%d zero=%d data=%d\n",
               (unsigned long long)off, (unsigned long long)len,
               (unsigned long long)st.len, kind_name(st.kind), st.allocated,
               st.zero, st.data);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s DIR [CORRUPT_IMAGE]\n", argv[0]);
        return 2;
    }
    char path[4096], missing[4096], opts[8192];
    snprintf(path, sizeof path, "%s/demo.qcow2", argv[1]);
    snprintf(missing, sizeof missing, "%s/missing.qcow2", argv[1]);
    qcow2kit_image *img = NULL;

    /* Error paths: a missing file, NULL arguments, a bad option string. */
    report("open missing", qcow2kit_open(missing, 0, &img), -ENOENT);
    report("read NULL handle", qcow2kit_read(NULL, path, 1, 0), -EINVAL);
    report("open NULL name", qcow2kit_open(NULL, 0, &img), -EINVAL);
    report("open bad option", qcow2kit_open_opts("driver=qcow2,file.filename=x,overlap-check=sometimes",
                                                 NULL, NULL, &img), -EINVAL);

    /* Create and open with a QEMU option string and an event callback. */
    report("create", qcow2kit_create(path, 16 * MiB, "cluster_size=65536"), 0);
    int events = 0;
    snprintf(opts, sizeof opts, "driver=qcow2,file.filename=%s,node-name=drive0", path);
    if (report("open_opts", qcow2kit_open_opts(opts, on_event, &events, &img), 0) != 0)
        return 1;
    uint64_t size = 0;
    report("get_length", qcow2kit_get_length(img, &size), 0);
    printf("length: %llu\n", (unsigned long long)size);

    /* Round trip: 64 KiB of a pattern at 1 MiB. */
    static unsigned char wbuf[65536], rbuf[65536];
    for (size_t i = 0; i < sizeof wbuf; i++)
        wbuf[i] = (unsigned char)(i * 7 + 3);
    report("write", qcow2kit_write(img, wbuf, sizeof wbuf, 1 * MiB), 0);
    report("read", qcow2kit_read(img, rbuf, sizeof rbuf, 1 * MiB), 0);
    printf("round trip: %s\n", memcmp(wbuf, rbuf, sizeof wbuf) ? "MISMATCH" : "equal");

    /* Vectored: three segments written at 2 MiB, read back split differently. */
    static char a[4096], b[512], c[60416];
    memset(a, 'a', sizeof a);
    memset(b, 'b', sizeof b);
    memset(c, 'c', sizeof c);
    struct iovec wv[3] = {{a, sizeof a}, {b, sizeof b}, {c, sizeof c}};
    report("writev", qcow2kit_writev(img, wv, 3, 2 * MiB), 0);
    static char r1[4608], r2[60416];
    struct iovec rv[2] = {{r1, sizeof r1}, {r2, sizeof r2}};
    report("readv", qcow2kit_readv(img, rv, 2, 2 * MiB), 0);
    int vec_ok = r1[0] == 'a' && r1[4095] == 'a' && r1[4096] == 'b' &&
                 r1[4607] == 'b' && r2[0] == 'c' && r2[sizeof r2 - 1] == 'c';
    printf("vectored round trip: %s\n", vec_ok ? "equal" : "MISMATCH");
    report("readv past end", qcow2kit_readv(img, rv, 2, 16 * MiB - 4096), -EINVAL);

    /* Block status, write-zeroes, discard. */
    status(img, 0, 16 * MiB);
    status(img, 1 * MiB, 15 * MiB);
    report("write_zeroes", qcow2kit_write_zeroes(img, 1 * MiB, 65536, false), 0);
    status(img, 1 * MiB, 65536);
    report("discard", qcow2kit_discard(img, 2 * MiB, 65536), 0);
    status(img, 2 * MiB, 65536);
    report("read zeroed", qcow2kit_read(img, rbuf, sizeof rbuf, 1 * MiB), 0);
    printf("zeroed reads zero: %s\n", rbuf[0] == 0 && rbuf[65535] == 0 ? "yes" : "NO");

    /* Resize, flush, close. */
    report("resize", qcow2kit_resize(img, 32 * MiB), 0);
    report("get_length", qcow2kit_get_length(img, &size), 0);
    printf("length: %llu\n", (unsigned long long)size);
    report("write at 31 MiB", qcow2kit_write(img, wbuf, 512, 31 * MiB), 0);
    report("flush", qcow2kit_flush(img), 0);
    report("close", qcow2kit_close(img), 0);
    printf("events on the healthy image: %d\n", events);

    /* Reopen read-only: the data is there, writes are refused. */
    report("open read-only", qcow2kit_open(path, QCOW2KIT_OPEN_READ_ONLY, &img), 0);
    memset(rbuf, 0, sizeof rbuf);
    report("read", qcow2kit_read(img, rbuf, 512, 31 * MiB), 0);
    printf("persisted: %s\n", memcmp(wbuf, rbuf, 512) ? "MISMATCH" : "equal");
    report("write read-only", qcow2kit_write(img, wbuf, 512, 0), -EPERM);
    report("close", qcow2kit_close(img), 0);

    /* Corruption: the write is refused, the event arrives, the handle is off. */
    if (argc > 2) {
        events = 0;
        snprintf(opts, sizeof opts, "driver=qcow2,file.filename=%s,node-name=bad0", argv[2]);
        report("open corrupt", qcow2kit_open_opts(opts, on_event, &events, &img), 0);
        report("write corrupt", qcow2kit_write(img, wbuf, 512, 0), -EIO);
        report("write again", qcow2kit_write(img, wbuf, 512, 0), -ENOMEDIUM);
        printf("events on the corrupt image: %d\n", events);
        qcow2kit_close(img);
        report("reopen corrupt read-write", qcow2kit_open(argv[2], 0, &img), -EACCES);
    }

    printf("failures: %d\n", failures);
    return failures ? 1 : 0;
}
