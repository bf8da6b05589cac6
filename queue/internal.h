/* What the queue's own files share and nobody else sees: the job, batch, model and queue
 * structs, and the helpers one concern offers another. The public face is queue.h; the seams
 * a shared deployment replaces are store.h (records, images) and backend.h (the runnable jobs
 * with their claims, and the event logs). One mutex (queue.mu) guards all of it: functions marked
 * "lock held" expect the caller to hold it. */
#ifndef DENOISED_QUEUE_INTERNAL_H
#define DENOISED_QUEUE_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <uv.h>

#include "backend.h"
#include "npy.h"
#include "pipeline.h"
#include "queue.h"
#include "store.h"

#define RING 64        /* progress events kept per job; older ones are superseded anyway */
#define PREVIEW_MAX 64 /* preview side in pixels */
#define EXPIRY_EVERY_MS 60000

typedef struct qmodel {
  char name[QUEUE_NAME_SIZE];
  char path[1024];
  char precision[8]; /* as configured: "" (fp32) or "bf16" */
  model *m;
  json_t *labels;
  json_t *classifier; /* queue_model_desc.classifier, or NULL */
  classifier *clf;    /* MODEL/classifier/ loaded (read-only, shared), or NULL */
  int refs;           /* the registry's own reference plus running batches */
} qmodel;

/* Loads the model `name` again from its folder (after a concept job added an embedding) and
 * puts the new copy in the registry; running batches keep the old one. */
int qmodel_reload(queue *q, const char *name, err *e);
/* A model a job made from the served model src (a stylization, a fine-tuning): written to
 * STATE_DIR/models/NAME-JOBID (src's configs, and its classifier if it has one, beside m's
 * weights; trained_by goes into the weights' metadata) and registered as NAME
 * (queue_register_model), so later jobs take it, after a restart too. Idempotent for one job
 * id: a run again after the daemon died mid-publish replaces or takes what the earlier one
 * left. */
int qmodel_publish(queue *q, const qmodel *src, const model *m, const char *name,
                   const char *job_id, const char *trained_by, err *e);

typedef struct qbatch qbatch;

/* A final state decided but not yet durable: see qjob_finish. */
typedef struct qfinal {
  queue_state state;
  double time;
  char why[512];
  char *event; /* the final event's text, sequence number next_seq */
  int writing; /* a persist is under way: the retry leaves it alone */
} qfinal;

/* A lifecycle event the backend refused (Redis away): kept, in order, until it is taken. */
typedef struct qunpublished {
  struct qunpublished *next;
  uint64_t seq;
  char type[QBACKEND_TYPE_SIZE];
  char *text;
} qunpublished;

typedef struct qjob {
  char id[QUEUE_ID_SIZE];
  queue_spec spec;
  queue_state state;
  int pending;  /* being written to the store: invisible until committed */
  int unpushed; /* queued on disk, but the backend refused it: the retry timer pushes it */
  double created, started, finished, t_mono_created, t_mono_started;
  int step, total, nfe, images, files;
  int attempts; /* runs started, persisted before each run begins */
  char error[512];
  uint64_t next_seq; /* of its next event; the events themselves are in the backend's log */
  uint64_t lease;    /* the backend's token for this process's claim while running, else 0 */
  double last_progress;
  qbatch *batch;
  /* Set between deciding a final state and writing it: readers see the job as it was (with
   * store_error once a write failed), so a state once reported terminal is on disk for good. */
  qfinal *final; /* the decided final state (&final_slot) until settled, else NULL */
  qfinal final_slot;
  char store_error[256];
  size_t retained; /* its estimated memory once finished and settled; 0: not counted yet */
  /* lifecycle events not in the backend's log yet, oldest first: readers of the log wait for
   * the final one, so a lost one would keep their streams open for good */
  qunpublished *unpublished;
} qjob;

struct qbatch {
  uv_work_t work;
  queue *q;
  qmodel *qm;
  qjob **jobs;
  int njobs, nimg;
  atomic_int cancel;
  int timed_out; /* stopped by max_job_seconds (lock held) */
  sampler *s;    /* the final sampling's solver (metadata), owned */
  double t_start, t_last;
  int h, w;
  const uint64_t *img_seed, *img_index; /* per image of a batch of several jobs */
  /* constant-time mode (pacing.c): the last evaluation slot of a data-dependent run, the
   * count of the last report, and whether the run needed more than constant_time_max_nfe */
  int pace_slot, pace_emitted, pace_over;
};

struct queue {
  queue_opts o;
  char state_dir[1024], url_prefix[128];
  store *st;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  qjob **jobs; /* sorted by id (creation order) */
  int njobs, capjobs;
  qbackend *be; /* the queued jobs (ids, in order) and every job's event log */
  /* be and st outlive this process (Redis): at recovery the logs and the queue already hold
   * what the records say, and a claim of this process's past life runs out by its lease */
  int shared;
  qbatch **running;
  int nrunning;
  qmodel **models;
  /* Models jobs made and registered (queue_register_model): name -> folder, as kept in
   * STATE_DIR/QUEUE_REGISTERED_FILE; read once, at the first queue_set_models. */
  json_t *registered;
  int nmodels;
  uv_loop_t loop;
  uv_async_t wake;
  uv_timer_t expiry;
  pthread_t thread;
  int started, stopping, loop_done;
  int closing; /* wake handle closed or closing: uv_async_send would abort */
  int busy;
  int npending;              /* submissions being written to the store, counted against queue_max */
  uint64_t fault_crash_seed; /* tests only: a job with this seed aborts the worker */
  store_fault env_fault;     /* tests only: DENOISED_FAULT_STORE */
  int fault_kill_after_record;    /* tests only: DENOISED_FAULT_KILL_AFTER_RECORD */
  int fault_kill_before_register; /* tests only: DENOISED_FAULT_KILL_BEFORE_REGISTER */
  uv_timer_t retry; /* writes final states that failed to be stored, probes the store */
  int unsettled;    /* jobs whose final state failed to be written */
  int unpublished;  /* whether some job may hold events the backend refused */
  int unpushed;     /* queued jobs the backend refused (qjob.unpushed) */
  int store_ok;     /* the last write or probe succeeded */
  char store_why[256];
  double last_probe;
  uint64_t fault_nan_seed; /* tests only: a job with this seed gets NaN step noise */
  int fault_pool_refuses;  /* tests only: the worker pool refuses the Nth batch handed to it */
  uint64_t last_id_ms;
  uint32_t id_counter;
  double t0, busy_seconds;
  uint64_t submitted, succeeded, failed, cancelled, rejected_full, rejected_limit, images_generated,
      batches, batched_jobs;
  queue_hist step_h, job_h, wait_h;
  uint64_t pace_overruns;
  uint64_t retained_bytes, expired_early; /* retained_budget: see queue_stats */
};

/* ---- queue.c: clocks, names, log ---- */
const char *qevent_type(const char *name); /* the interned event type, or "message" */
int qstate_final(queue_state s);
double qclock_real(void);
double qclock_mono(void);
void qhist_observe(queue_hist *h, double v);
void qlog(queue *q, queue_log_level level, const char *id, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* ---- spec.c ---- */
int qspec_has_noise(const queue_spec *s);
/* A copy without the large inputs, what views carry: input_image and mask are "" when the job
 * has them, edit_args' noise is true and its boundary only attribute, step and model; no decoded
 * inputs. The job's record keeps the inputs. */
int qspec_copy_light(queue_spec *dst, const queue_spec *src);
/* Drops s's large inputs as qspec_copy_light does, once nothing will run or store them again:
 * a finished job whose final record is on disk and whose batch is over (lock held). */
void qspec_release_inputs(queue_spec *s);

/* ---- jobs.c: the job index, the FIFO and the per-job event log (lock held unless said) ---- */
/* Frees the job in memory; its event log stays in the backend (shared with other nodes). */
void qjob_free(qjob *j);
/* Frees a job that leaves for good (expired, never accepted) together with its event log. */
void qjob_discard(queue *q, qjob *j);
/* Appends an event to the job's log (data: stolen); lifecycle events are kept for good,
 * progress as the backend's transient events (the newest RING). */
void qjob_emit(queue *q, qjob *j, const char *type, json_t *data, int lifecycle);
/* Appends the lifecycle events the backend refused earlier (lock held), oldest first, until
 * one is refused again; the retry tick calls it. */
void qjob_publish_unpublished(queue *q);
/* The job's durable record (malloc'ed JSON text); NULL out of memory or when the backend's
 * event log cannot be read (then e, if given, says which). */
char *qjob_record(queue *q, const qjob *j, size_t *len, err *e);
/* Writes a record through the store; lock released. Takes text. */
int qjob_persist(queue *q, const char *id, char *text, size_t len);
int qjob_index(queue *q, const char *id, int *pos);
/* The committed job `id`, or NULL (also when owner is set and differs). */
qjob *qjob_find(queue *q, const char *id, const char *owner);
int qjob_insert(queue *q, qjob *j);
void qjob_remove_at(queue *q, int pos);
int qjob_enqueue(queue *q, qjob *j);
/* Pushes the jobs the backend refused before (lock held). */
void qjob_push_unpushed(queue *q);
void qjob_unqueue(queue *q, const qjob *j);
int qjob_nqueued(queue *q);
/* The queued jobs in order (malloc'ed, *n of them; NULL with *n = 0 when none or out of
 * memory); ids the backend holds that this process does not know are skipped. */
qjob **qjob_queued(queue *q, int *n);
void qjob_view(queue *q, const qjob *j, queue_job_view *v);
void qjob_make_id(queue *q, char *out);
/* Decides j's final state st and returns the record that says so, for qjob_settle_write
 * (unlocked); nothing readers see changes until the record is on disk. */
char *qjob_finish(queue *q, qjob *j, queue_state st, const char *why, size_t *len);
/* Writes a record from qjob_finish (lock not held) and settles: on success the final state
 * becomes what readers see (event included); on failure the job waits, visible with its
 * store_error, for the loop's retry. Takes text. */
int qjob_settle_write(queue *q, qjob *j, char *text, size_t len);
/* Whether j still runs: running, and no final state decided (lock held). */
int qjob_live(const qjob *j);
/* Records a storage failure or success for readiness (lock held). */
void qstore_note(queue *q, int rc, const char *why);

/* ---- models.c: the model registry and solver specs to samplers ---- */
void qmodel_unref(qmodel *m);
qmodel *qmodel_find(queue *q, const char *name);

/* ---- request.c: a spec as the pipeline's typed request ---- */
typedef struct qrequest {
  pipeline_request r;
  guidance g, gsrc;
  int64_t *labels, *src_labels;
  float *image, *mask; /* decoded once; the pipeline replicates them */
  npy_array noise;
  boundary bd;
  int has_bd;
  classifier *clf; /* classifier guidance: the model's classifier, loaded for the job */
  int64_t *targets;
  classifier_guidance cg;
} qrequest;
/* Fills q from sp (its inputs decoded, its edit arguments typed); qrequest_free in any case. */
int qrequest_from_spec(const model *m, const queue_spec *sp, qrequest *q, err *e);
void qrequest_free(qrequest *q);

/* ---- pacing.c: constant-time mode ---- */
/* Where a run is, as its jobs are told: step of total, evaluations, whole seconds. */
typedef struct qreport {
  int step, total, nfe;
  double elapsed, eta;
} qreport;
/* Tells b's live jobs (lock not held); preview (a data URL or NULL) goes to the head job. */
typedef void (*qreport_fn)(qbatch *b, const qreport *r, const char *preview);
int qpace_on(const qbatch *b);
/* At a step boundary: waits out the budget of the evaluations so far and reports what is due
 * by the budget's clock (a data-dependent solver: its slots, none of its previews). A run over
 * constant_time_max_nfe is cancelled with pace_over set. */
void qpace_step(qbatch *b, const pipeline_progress *p, qreport_fn emit, const char *preview);
/* After a successful run of nfe evaluations: a data-dependent solver's remaining slots, waited
 * out and reported; -1 (pace_over set) if it needed more than constant_time_max_nfe. */
int qpace_finish(qbatch *b, int nfe, qreport_fn emit);

/* ---- worker.c: one batch on a libuv pool thread ---- */
void qworker_run(uv_work_t *w);
/* A step of the batch's run (a pipeline_progress hook; user is the qbatch): its event,
 * max_job_seconds, and the cancel set when the jobs are cancelled or the daemon stops. */
void qworker_progress(const pipeline_progress *p, void *user);

/* ---- finetune.c: a fine-tuning job's training (QUEUE_EDIT_FINETUNE) ---- */
/* Trains *own (a copy of the batch's model, loaded here) on the job's images with a step
 * event each, stops at a cancel, then publishes it under the job's name (qmodel_publish). */
int qfinetune_run(qbatch *b, model **own, err *e);

/* ---- loop.c: the scheduler thread ---- */
void qloop_wake(queue *q);

/* ---- recovery.c: jobs back from the store at start ---- */
/* Every record in the store back as a job; queued ones in the backend's queue, in id order. */
int qrecovery_run(queue *q, err *e);
/* The job a record describes, its events in (or, shared, its numbering from) the backend's
 * log; NULL (logged) when the record cannot be read. */
qjob *qrecord_parse(queue *q, const char *id, const char *text, size_t len);

/* ---- shared.c: several daemons on one store and backend (Redis); no-ops otherwise ---- */
/* Reads id's record again if this copy may be out of date (not running here, not final), or
 * adopts the job if this process has never seen it. Unlocked. */
void qshared_refresh(queue *q, const char *id);
/* Before a listing (unlocked): the jobs of the shared store newer than the cursor before,
 * newest first, that this process does not know or may know out of date, are read, until the
 * listing's limit is passed or QUEUE_LIST_READS records were read (a listing costs at most that
 * many reads; the rest come with the next page). */
#define QUEUE_LIST_READS 256
void qshared_list_sync(queue *q, const char *owner, const char *before, int state, int limit);
/* Adopts the jobs at the head of the shared queue this process has never seen. Unlocked. */
void qshared_adopt(queue *q);
/* Lock held, right after j was claimed: continues j's event numbering after the shared log;
 * a job whose last run died with its process is queued again ("restarted"), or failed once it
 * has crashed max_attempts runs (then 0: the claim is completed and j must not run); a job that
 * had already ended (its claim came back because Redis was away when it ended) is left so (0). */
int qshared_claimed(queue *q, qjob *j);
/* Lock held: a cancel of j, which this process is not running: 1 when it was handed to the
 * daemon that is (or the job was claimed meanwhile), 0 when j is to be cancelled here (it was
 * taken out of the shared queue, or nothing is shared). */
int qshared_cancel_elsewhere(queue *q, qjob *j);
/* Lock held: up to max jobs running here that another daemon was asked to cancel. */
int qshared_cancels_asked(queue *q, qbackend_id *ids, int max);

#endif
