/* The secure world's fast path (tee_sim.secure_world_fast): it waits for requests in the control block
 * (tee_sim.channel) and answers, without returning to Python, every OP_INVOKE of a prepared step command
 * whose work is C calls only - the kernels of a trusted app's steps. Anything else
 * (another command, a step out of order, a step with Python work) it leaves to Python, unanswered. An
 * inference's first step it answers only when the trusted app has taken that inference's pool entry
 * ahead (cursor AHEAD): the trusted app's Python picks the entry, between inferences.
 *
 * Why: a step of ResNet-404 (a 32x32x16 restore and push) takes 10.5 us of kernels, and the secure
 * world's Python around it - the request's unpacking, the secure OS's dispatch and parameters, the trusted
 * app's entry point, the response - took 13.5 us more (measured in the secure world, 12000 steps).
 *
 * Plain C, loaded with ctypes (the call releases the GIL: the secure world's watchdog thread runs on).
 */
#define _POSIX_C_SOURCE 200809L
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* tee_sim.channel's layout */
enum { REQ_SEQ = 0, RESP_SEQ = 8, NW_SLEEPING = 24 };           /* u64 words */
enum { REQUEST_OFFSET = 256, RESPONSE_OFFSET = 512 };           /* bytes */
enum { OP_INVOKE = 1, VALUE_INPUT = 1, ORIGIN_TEE = 3 };
enum { FINISHED = -1, AHEAD = -2, STOPPED = -3 };               /* tee_sim.secure_world_fast's */

#define MAX_PROGRAMS 32

typedef int (*sw_call)(const void *);

/* One session's step command: step s (0 <= s < steps) runs calls [starts[s], ends[s]) when starts[s] >= 0
 * and cursor[0] == s (the step the trusted app expects next; for step 0, AHEAD: the inference's pool entry
 * is taken), then sets cursor[0] = s + 1, or `finish` after the last step (FINISHED: the trusted app
 * settles the inference at its next entry; AHEAD: it has nothing to settle nor to take). A call that
 * returns non-zero (a verified restore whose check failed; a one-time mask that must move to its input's
 * spread) stops the step, left unanswered to the trusted app's Python, with cursor = {STOPPED, the step,
 * the call's place in it, what the call returned}: no step runs here until Python has settled it. A failed
 * check is an integrity error there, from what this run found: it is not run again (a run again read the
 * results anew, and a normal world that put the honest ones back in between had its tampering pass
 * unreported; a helper's probe). Otherwise Python runs that step on from the call's instruction (the ones
 * before it ran, and may have reused a slot an earlier one read, or sent a tensor under a one-time mask:
 * running them again is not safe) and moves the mask; any other step but a new inference's step 0 ends
 * the inference (a normal world may rewrite the request between this copy of it and Python's). */
typedef struct {
    uint32_t session, cmd;
    int64_t steps, finish;
    int32_t *cursor;
    const int64_t *starts, *ends;
    const sw_call *fns;
    void *const *args;
} sw_program;

typedef struct {
    uint8_t *block;                 /* the control block */
    int64_t spin_ns;                /* how long to wait for a request, yielding the core between looks */
    int32_t resp_efd;               /* the normal world's eventfd, kicked when it sleeps */
    int32_t count;                  /* programs in use */
    uint64_t memory[3];             /* secure memory used, peak, cap: what every answer reports */
    int64_t served;                 /* requests answered here */
    sw_program programs[MAX_PROGRAMS];
} sw_world;

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Serve requests after *last (the sequence number of the last answered one) until one that Python must
 * handle arrives (returns 1; it stays unanswered) or spin_ns pass without any (returns 0). *last follows
 * every request answered here. The request is copied out before it is checked: the normal world may
 * rewrite the block at any time. */
int sw_serve(sw_world *w, uint64_t *last) {
    volatile uint64_t *words = (volatile uint64_t *)w->block;
    int64_t deadline = now_ns() + w->spin_ns;
    for (;;) {
        uint64_t seq = __atomic_load_n(&words[REQ_SEQ], __ATOMIC_ACQUIRE);
        if (seq == *last) {
            if (now_ns() >= deadline) return 0;
            sched_yield();
            continue;
        }
        uint32_t head[4]; /* op, session, command, parameter types */
        uint64_t step;
        memcpy(head, w->block + REQUEST_OFFSET, sizeof head);
        memcpy(&step, w->block + REQUEST_OFFSET + sizeof head, sizeof step);
        if (head[0] != OP_INVOKE || head[3] != VALUE_INPUT) return 1;
        const sw_program *p = NULL;
        for (int32_t i = 0; i < w->count; i++)
            if (w->programs[i].session == head[1] && w->programs[i].cmd == head[2]) p = &w->programs[i];
        if (p == NULL || step >= (uint64_t)p->steps || p->starts[step] < 0
                || p->cursor[0] != (step == 0 ? AHEAD : (int64_t)step))
            return 1;
        int64_t start = now_ns();
        int64_t k = p->starts[step];
        int status = 0;
        while (k < p->ends[step] && (status = p->fns[k](p->args[k])) == 0) k++;
        if (k < p->ends[step]) { /* a call failed: the TA's Python settles the step from it */
            p->cursor[1] = (int32_t)step;
            p->cursor[2] = (int32_t)(k - p->starts[step]);
            p->cursor[3] = status;
            p->cursor[0] = STOPPED;
            return 1;
        }
        p->cursor[0] = step + 1 == (uint64_t)p->steps ? (int32_t)p->finish : (int32_t)step + 1;
        uint32_t code[4] = {0, ORIGIN_TEE, 0, 0}; /* success, origin, session, message length */
        uint64_t figures[4] = {(uint64_t)(now_ns() - start), w->memory[0], w->memory[1], w->memory[2]};
        memcpy(w->block + RESPONSE_OFFSET, code, sizeof code);
        memcpy(w->block + RESPONSE_OFFSET + sizeof code, figures, sizeof figures);
        __atomic_store_n(&words[RESP_SEQ], seq, __ATOMIC_RELEASE);
        if (words[NW_SLEEPING]) {
            uint64_t one = 1;
            if (write(w->resp_efd, &one, sizeof one) < 0) { /* the normal world polls with a timeout too */ }
        }
        *last = seq;
        w->served++;
        deadline = now_ns() + w->spin_ns;
    }
}
