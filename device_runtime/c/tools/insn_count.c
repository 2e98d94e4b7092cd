/* A QEMU TCG plugin (plugin API version 1, QEMU 7.2) that counts executed guest instructions.
 *
 *   qemu-system-arm ... -plugin ./libinsn.so[,begin=0xADDR,end=0xADDR][,out=FILE]
 *   qemu-system-arm ... -plugin ./libinsn.so,part=0xADDR0,part=0xADDR1,...,dump=0xADDR,out=FILE
 *
 * Every instruction adds 1 to a counter (inline, so counts are exact and identical across runs). With
 * begin/end addresses (the firmware's fedtiny_mark_begin / fedtiny_mark_end), it also sums the instructions
 * executed from each begin to the next end ("region") and how many such regions ran. At exit it writes
 * "insns total=T region=R regions=N" and a second line "each C1 C2 ..." (every region's own count, in the
 * order they ran) to FILE, or through qemu_plugin_outs (shown with -d plugin).
 *
 * Parts (a running node): each `part=` address is the marker function of one part of the firmware (idle,
 * protocol, crypto, training, ... in the order given); executing it makes that part the one every following
 * instruction is counted to, until another part's marker runs (the firmware's fedtiny_profile.c calls them
 * as it enters and leaves each part). Executing the `dump=` address appends one line "parts C0 C1 ..." of the
 * counts so far to FILE and flushes it, so a host reads a node's counts while it runs (once per round).
 *
 * Debian ships no qemu-plugin.h, so the few types and functions used are declared below as documented in
 * QEMU's include/qemu/qemu-plugin.h. Built with: gcc -shared -fPIC -O2 -o libinsn.so insn_count.c
 */
#include <inttypes.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the subset of qemu-plugin.h this plugin uses ---- */
typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t {
    const char *target_name;
    struct {
        int min;
        int cur;
    } version;
    bool system_emulation;
    union {
        struct {
            int smp_vcpus;
            int max_vcpus;
        } system;
    };
} qemu_info_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_CB_R_REGS, QEMU_PLUGIN_CB_RW_REGS };
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *insn);
void qemu_plugin_register_vcpu_insn_exec_inline(struct qemu_plugin_insn *insn, enum qemu_plugin_op op,
                                                void *ptr, uint64_t imm);
void qemu_plugin_register_vcpu_insn_exec_cb(struct qemu_plugin_insn *insn, qemu_plugin_vcpu_udata_cb_t cb,
                                            enum qemu_plugin_cb_flags flags, void *userdata);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *userdata);
void qemu_plugin_outs(const char *string);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

/* ---- the plugin ---- */
static uint64_t total;      /* instructions executed (one vCPU on Cortex-M) */
static uint64_t region;     /* instructions between begin and end markers, summed */
static uint64_t regions;    /* completed begin..end regions */
static uint64_t started_at; /* total when the current region began */
static uint64_t *each;      /* each region's count, in order; `regions` of them (grown as needed) */
static uint64_t each_capacity;
static uint64_t begin_addr = UINT64_MAX, end_addr = UINT64_MAX;
static char out_path[1024];
#define MAX_PARTS 8
static uint64_t part_addr[MAX_PARTS], part_count[MAX_PARTS], part_started_at;
static int n_parts, current_part;
static uint64_t dump_addr = UINT64_MAX;
static FILE *dump_file;

static void on_begin(unsigned int vcpu_index, void *userdata)
{
    (void)vcpu_index;
    (void)userdata;
    started_at = total;
}

static void on_end(unsigned int vcpu_index, void *userdata)
{
    (void)vcpu_index;
    (void)userdata;
    if (regions == each_capacity) {
        uint64_t capacity = each_capacity ? 2 * each_capacity : 64;
        uint64_t *grown = realloc(each, capacity * sizeof *grown);
        if (!grown) {
            fprintf(stderr, "insn_count: out of memory\n");
            exit(1);
        }
        each = grown;
        each_capacity = capacity;
    }
    each[regions] = total - started_at;
    region += total - started_at;
    regions++;
}

/* The part whose marker ran: the instructions since the last switch go to the part that was running. */
static void on_part(unsigned int vcpu_index, void *userdata)
{
    (void)vcpu_index;
    part_count[current_part] += total - part_started_at;
    part_started_at = total;
    current_part = (int)(uintptr_t)userdata;
}

static void on_dump(unsigned int vcpu_index, void *userdata)
{
    int i;
    (void)vcpu_index;
    (void)userdata;
    if (!dump_file) {
        return;
    }
    part_count[current_part] += total - part_started_at;
    part_started_at = total;
    fprintf(dump_file, "parts");
    for (i = 0; i < n_parts; i++) {
        fprintf(dump_file, " %" PRIu64, part_count[i]);
    }
    fputc('\n', dump_file);
    fflush(dump_file);
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t i, n = qemu_plugin_tb_n_insns(tb);
    (void)id;
    for (i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint64_t pc = qemu_plugin_insn_vaddr(insn);
        if (pc == begin_addr) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_begin, QEMU_PLUGIN_CB_NO_REGS, NULL);
        }
        if (pc == end_addr) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_end, QEMU_PLUGIN_CB_NO_REGS, NULL);
        }
        for (int p = 0; p < n_parts; p++) {
            if (pc == part_addr[p]) {
                qemu_plugin_register_vcpu_insn_exec_cb(insn, on_part, QEMU_PLUGIN_CB_NO_REGS, (void *)(uintptr_t)p);
            }
        }
        if (pc == dump_addr) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_dump, QEMU_PLUGIN_CB_NO_REGS, NULL);
        }
        qemu_plugin_register_vcpu_insn_exec_inline(insn, QEMU_PLUGIN_INLINE_ADD_U64, &total, 1);
    }
}

static void write_counts(FILE *f)
{
    uint64_t i;
    fprintf(f, "insns total=%" PRIu64 " region=%" PRIu64 " regions=%" PRIu64 "\neach", total, region, regions);
    for (i = 0; i < regions; i++) {
        fprintf(f, " %" PRIu64, each[i]);
    }
    fputc('\n', f);
}

static void on_qemu_exit(qemu_plugin_id_t id, void *userdata)
{
    (void)id;
    (void)userdata;
    if (dump_file) { /* the lines went out at each dump */
        fclose(dump_file);
        return;
    }
    if (out_path[0]) {
        FILE *f = fopen(out_path, "w");
        if (f) {
            write_counts(f);
            fclose(f);
        }
    } else {
        char *text = NULL;
        size_t size = 0;
        FILE *f = open_memstream(&text, &size);
        if (f) {
            write_counts(f);
            fclose(f);
            qemu_plugin_outs(text);
            free(text);
        }
    }
    free(each);
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                                               int argc, char **argv)
{
    int i;
    (void)info;
    for (i = 0; i < argc; i++) {
        if (strncmp(argv[i], "begin=", 6) == 0) {
            begin_addr = strtoull(argv[i] + 6, NULL, 0) & ~(uint64_t)1; /* Thumb symbols have bit 0 set */
        } else if (strncmp(argv[i], "end=", 4) == 0) {
            end_addr = strtoull(argv[i] + 4, NULL, 0) & ~(uint64_t)1;
        } else if (strncmp(argv[i], "part=", 5) == 0 && n_parts < MAX_PARTS) {
            part_addr[n_parts++] = strtoull(argv[i] + 5, NULL, 0) & ~(uint64_t)1;
        } else if (strncmp(argv[i], "dump=", 5) == 0) {
            dump_addr = strtoull(argv[i] + 5, NULL, 0) & ~(uint64_t)1;
        } else if (strncmp(argv[i], "out=", 4) == 0) {
            snprintf(out_path, sizeof out_path, "%s", argv[i] + 4);
        } else {
            fprintf(stderr, "insn_count: unknown argument %s\n", argv[i]);
            return -1;
        }
    }
    if (dump_addr != UINT64_MAX) {
        if (!out_path[0] || !(dump_file = fopen(out_path, "a"))) {
            fprintf(stderr, "insn_count: dump= needs a writable out=FILE\n");
            return -1;
        }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, on_qemu_exit, NULL);
    return 0;
}
