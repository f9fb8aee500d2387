// The C++ half of the cxx bridge: thin wrappers over the SDK's static-inline services and the C
// callbacks Orthanc calls (REST, changes, jobs), each forwarding to Rust and never throwing into Orthanc.
#include "desam/cpp/orthanc_shim.h"
#include "desam/src/orthanc/bridge.rs.h"

#include <cstring>
#include <stdexcept>
#include <vector>

namespace desam_shim {

namespace {

OrthancPluginContext* g_context = nullptr;

OrthancPluginContext* context() {
  if (g_context == nullptr) {
    throw std::runtime_error("the Orthanc plugin context is not initialised");
  }
  return g_context;
}

std::string to_std(rust::Str s) { return std::string(s.data(), s.size()); }

// Keeps the job id and the last content string alive for Orthanc (it reads the pointer we return).
struct JobHandle {
  uint64_t id;
  std::string content;
};

void job_finalize(void* job) {
  auto* handle = static_cast<JobHandle*>(job);
  try {
    desam_job_finalize(handle->id);
  } catch (...) {
  }
  delete handle;
}

float job_progress(void* job) {
  try {
    return desam_job_progress(static_cast<JobHandle*>(job)->id);
  } catch (...) {
    return 0.0f;
  }
}

const char* job_content(void* job) {
  auto* handle = static_cast<JobHandle*>(job);
  try {
    rust::String s = desam_job_content(handle->id);
    handle->content.assign(s.data(), s.size());
  } catch (...) {
    handle->content = "{}";
  }
  return handle->content.c_str();
}

const char* job_serialized(void*) {
  // Not serialised: after a restart the catch-up walk over /changes re-creates pending work.
  return nullptr;
}

OrthancPluginJobStepStatus job_step(void* job) {
  try {
    switch (desam_job_step(static_cast<JobHandle*>(job)->id)) {
      case 1:
        return OrthancPluginJobStepStatus_Success;
      case 3:
        return OrthancPluginJobStepStatus_Continue;
      default:
        return OrthancPluginJobStepStatus_Failure;
    }
  } catch (...) {
    return OrthancPluginJobStepStatus_Failure;
  }
}

OrthancPluginErrorCode job_stop(void* job, OrthancPluginJobStopReason reason) {
  try {
    desam_job_stop(static_cast<JobHandle*>(job)->id, static_cast<int32_t>(reason));
  } catch (...) {
  }
  return OrthancPluginErrorCode_Success;
}

OrthancPluginErrorCode job_reset(void* job) {
  try {
    desam_job_reset(static_cast<JobHandle*>(job)->id);
  } catch (...) {
  }
  return OrthancPluginErrorCode_Success;
}

OrthancPluginErrorCode on_change(OrthancPluginChangeType change_type,
                                 OrthancPluginResourceType resource_type,
                                 const char* resource_id) {
  try {
    desam_on_change(static_cast<int32_t>(change_type), static_cast<int32_t>(resource_type),
                    rust::Str(resource_id == nullptr ? "" : resource_id));
  } catch (...) {
  }
  return OrthancPluginErrorCode_Success;
}

OrthancPluginErrorCode on_rest(OrthancPluginRestOutput* output, const char* url,
                               const OrthancPluginHttpRequest* request) {
  OrthancPluginContext* ctx = g_context;
  try {
    rust::Vec<rust::String> groups;
    for (uint32_t i = 0; i < request->groupsCount; i++) {
      groups.push_back(rust::String(request->groups[i]));
    }
    rust::Slice<const uint8_t> body(static_cast<const uint8_t*>(request->body),
                                    request->body == nullptr ? 0 : request->bodySize);
    RestReply reply = desam_rest(static_cast<uint32_t>(request->method), rust::Str(url),
                                 std::move(groups), body);
    std::string content_type(reply.content_type.data(), reply.content_type.size());
    if (reply.status == 200) {
      OrthancPluginAnswerBuffer(ctx, output, reinterpret_cast<const char*>(reply.body.data()),
                                static_cast<uint32_t>(reply.body.size()), content_type.c_str());
    } else if (reply.status == 405) {
      std::string allow(reply.allow.data(), reply.allow.size());
      OrthancPluginSendMethodNotAllowed(ctx, output, allow.c_str());
    } else {
      OrthancPluginSendHttpStatus(ctx, output, reply.status,
                                  reinterpret_cast<const char*>(reply.body.data()),
                                  static_cast<uint32_t>(reply.body.size()));
    }
    return OrthancPluginErrorCode_Success;
  } catch (...) {
    return OrthancPluginErrorCode_Plugin;
  }
}

}  // namespace

Answer::Answer() : code_(OrthancPluginErrorCode_Success), owns_(false) {
  std::memset(&buffer_, 0, sizeof(buffer_));
}

Answer::~Answer() {
  if (owns_ && g_context != nullptr) {
    OrthancPluginFreeMemoryBuffer(g_context, &buffer_);
  }
}

FullAnswer::FullAnswer() : code_(OrthancPluginErrorCode_Success), status_(0) {
  std::memset(&body_, 0, sizeof(body_));
  std::memset(&headers_, 0, sizeof(headers_));
}

FullAnswer::~FullAnswer() {
  if (g_context != nullptr) {
    if (body_.data != nullptr) OrthancPluginFreeMemoryBuffer(g_context, &body_);
    if (headers_.data != nullptr) OrthancPluginFreeMemoryBuffer(g_context, &headers_);
  }
}

int32_t FullAnswer::code() const { return static_cast<int32_t>(code_); }
uint16_t FullAnswer::status() const { return status_; }

rust::Slice<const uint8_t> FullAnswer::body() const {
  if (body_.data == nullptr) return rust::Slice<const uint8_t>();
  return rust::Slice<const uint8_t>(static_cast<const uint8_t*>(body_.data), body_.size);
}

rust::Slice<const uint8_t> FullAnswer::headers() const {
  if (headers_.data == nullptr) return rust::Slice<const uint8_t>();
  return rust::Slice<const uint8_t>(static_cast<const uint8_t*>(headers_.data), headers_.size);
}

std::unique_ptr<FullAnswer> rest_call(uint32_t method, rust::Str uri, rust::Str if_match, rust::Slice<const uint8_t> body) {
  std::unique_ptr<FullAnswer> answer(new FullAnswer());
  std::string u = to_std(uri);
  std::string m = to_std(if_match);
  const char* keys[] = {"If-Match"};
  const char* values[] = {m.c_str()};
  uint32_t n = m.empty() ? 0 : 1;
  answer->code_ = OrthancPluginCallRestApi(context(), &answer->body_, &answer->headers_, &answer->status_,
                                           static_cast<OrthancPluginHttpMethod>(method), u.c_str(), n,
                                           n ? keys : nullptr, n ? values : nullptr, body.data(),
                                           static_cast<uint32_t>(body.size()), 0);
  return answer;
}

int32_t Answer::code() const { return static_cast<int32_t>(code_); }

rust::Slice<const uint8_t> Answer::data() const {
  if (!owns_ || buffer_.data == nullptr) {
    return rust::Slice<const uint8_t>();
  }
  return rust::Slice<const uint8_t>(static_cast<const uint8_t*>(buffer_.data), buffer_.size);
}

rust::String Answer::error() const {
  if (code_ == OrthancPluginErrorCode_Success) {
    return rust::String();
  }
  const char* text = OrthancPluginGetErrorDescription(context(), code_);
  return rust::String(text == nullptr ? "unknown error" : text);
}

void init_context(OrthancPluginContext* ctx) { g_context = ctx; }

bool check_version() { return OrthancPluginCheckVersion(context()) != 0; }

rust::String orthanc_version() {
  const char* v = context()->orthancVersion;
  return rust::String(v == nullptr ? "" : v);
}

void set_description(rust::Str text) {
  std::string s = to_std(text);
  OrthancPluginSetDescription(context(), s.c_str());
}

void log_message(uint8_t level, rust::Str message) {
  if (g_context == nullptr) return;
  std::string s = to_std(message);
  switch (level) {
    case 0:
      OrthancPluginLogError(g_context, s.c_str());
      break;
    case 1:
      OrthancPluginLogWarning(g_context, s.c_str());
      break;
    default:
      OrthancPluginLogInfo(g_context, s.c_str());
      break;
  }
}

rust::String get_configuration() {
  char* text = OrthancPluginGetConfiguration(context());
  if (text == nullptr) {
    throw std::runtime_error("OrthancPluginGetConfiguration failed");
  }
  rust::String result(text);
  OrthancPluginFreeString(context(), text);
  return result;
}

std::unique_ptr<Answer> rest_get(rust::Str uri) {
  std::unique_ptr<Answer> answer(new Answer());
  std::string u = to_std(uri);
  answer->code_ = OrthancPluginRestApiGet(context(), &answer->buffer_, u.c_str());
  answer->owns_ = (answer->code_ == OrthancPluginErrorCode_Success);
  return answer;
}

std::unique_ptr<Answer> rest_post(rust::Str uri, rust::Slice<const uint8_t> body) {
  std::unique_ptr<Answer> answer(new Answer());
  std::string u = to_std(uri);
  answer->code_ = OrthancPluginRestApiPost(context(), &answer->buffer_, u.c_str(),
                                           reinterpret_cast<const char*>(body.data()),
                                           static_cast<uint32_t>(body.size()));
  answer->owns_ = (answer->code_ == OrthancPluginErrorCode_Success);
  return answer;
}

int32_t rest_delete(rust::Str uri) {
  std::string u = to_std(uri);
  return static_cast<int32_t>(OrthancPluginRestApiDelete(context(), u.c_str()));
}

rust::String get_global_property(int32_t property, rust::Str default_value) {
  std::string d = to_std(default_value);
  char* value = OrthancPluginGetGlobalProperty(context(), property, d.c_str());
  if (value == nullptr) {
    throw std::runtime_error("OrthancPluginGetGlobalProperty failed");
  }
  rust::String result(value);
  OrthancPluginFreeString(context(), value);
  return result;
}

int32_t set_global_property(int32_t property, rust::Str value) {
  std::string v = to_std(value);
  return static_cast<int32_t>(OrthancPluginSetGlobalProperty(context(), property, v.c_str()));
}

void set_metric(rust::Str name, float value, bool is_timer) {
  if (g_context == nullptr) return;
  std::string n = to_std(name);
  OrthancPluginSetMetricsValue(g_context, n.c_str(), value,
                               is_timer ? OrthancPluginMetricsType_Timer
                                        : OrthancPluginMetricsType_Default);
}

void register_rest_route(rust::Str path_regex) {
  std::string r = to_std(path_regex);
  OrthancPluginRegisterRestCallbackNoLock(context(), r.c_str(), on_rest);
}

void register_on_change() { OrthancPluginRegisterOnChangeCallback(context(), on_change); }

rust::String submit_job(uint64_t id, rust::Str job_type, int32_t priority) {
  std::string type = to_std(job_type);
  auto* handle = new JobHandle{id, "{}"};
  OrthancPluginJob* job =
      OrthancPluginCreateJob(context(), handle, job_finalize, type.c_str(), job_progress,
                             job_content, job_serialized, job_step, job_stop, job_reset);
  if (job == nullptr) {
    delete handle;
    throw std::runtime_error("OrthancPluginCreateJob failed");
  }
  char* job_id = OrthancPluginSubmitJob(context(), job, priority);
  if (job_id == nullptr) {
    // Ownership is unclear after a failed submission; leaking one small handle beats a double free.
    throw std::runtime_error("OrthancPluginSubmitJob failed");
  }
  rust::String result(job_id);
  OrthancPluginFreeString(context(), job_id);
  return result;
}

}  // namespace desam_shim
