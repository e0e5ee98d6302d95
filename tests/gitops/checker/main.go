// gitops-check evaluates a Kubernetes object the way GitOps tools do, for tests/gitops.rs.
//
//	gitops-check health [--open-libs] SCRIPT.lua < object.json
//	    runs an Argo CD resource health check (Lua) on the object, as Argo CD's controller does: the
//	    object (decoded like an unstructured object: integers are int64) is the global `obj`, only the
//	    package, base and table libraries are open (all of them with --open-libs, as for the checks
//	    built into Argo CD), the script has one second, and it must return a table whose `status` is
//	    a health status Argo CD knows. Prints {"status": ..., "message": ...}.
//
//	gitops-check kstatus < object.json
//	    computes the object's kstatus (sigs.k8s.io/cli-utils/pkg/kstatus/status), what Flux's
//	    kustomize-controller and `kubectl wait`-style tools read. Prints {"status": ..., "message": ...}.
//
//	gitops-check flux KUSTOMIZATIONS.yaml < object.json
//	    evaluates the `healthCheckExprs` for the object's kind found in a file of Flux Kustomizations
//	    with Flux's own evaluator (github.com/fluxcd/pkg/runtime/cel). An expression that fails to
//	    evaluate gives Unknown with the error, as Flux's status reader reports it.
//
// Errors (a script that fails, returns no table, or an invalid status) go to stderr with exit code 1.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/fluxcd/pkg/apis/kustomize"
	fluxcel "github.com/fluxcd/pkg/runtime/cel"
	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	k8syaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

// The health statuses Argo CD accepts from a Lua check.
var validHealth = map[string]bool{
	"Healthy": true, "Progressing": true, "Degraded": true, "Suspended": true, "Missing": true, "Unknown": true,
}

type result struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "gitops-check:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("usage: gitops-check health [--open-libs] SCRIPT.lua | kstatus  (object JSON on stdin)")
	}
	obj, err := readObject(os.Stdin)
	if err != nil {
		return err
	}
	var out result
	switch args[0] {
	case "health":
		openLibs := false
		rest := args[1:]
		if len(rest) > 0 && rest[0] == "--open-libs" {
			openLibs, rest = true, rest[1:]
		}
		if len(rest) != 1 {
			return fmt.Errorf("health needs exactly one script")
		}
		script, err := os.ReadFile(rest[0])
		if err != nil {
			return err
		}
		out, err = health(obj, string(script), openLibs)
		if err != nil {
			return err
		}
	case "flux":
		if len(args) != 2 {
			return fmt.Errorf("flux needs exactly one file of Kustomizations")
		}
		out, err = flux(obj, args[1])
		if err != nil {
			return err
		}
	case "kstatus":
		res, err := status.Compute(obj)
		if err != nil {
			return fmt.Errorf("kstatus: %w", err)
		}
		out = result{Status: res.Status.String(), Message: res.Message}
	default:
		return fmt.Errorf("unknown command %q", args[0])
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}

// readObject decodes JSON the way client-go does for unstructured objects (integers become int64).
func readObject(r io.Reader) (*unstructured.Unstructured, error) {
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, err
	}
	obj := &unstructured.Unstructured{}
	if err := obj.UnmarshalJSON(data); err != nil {
		return nil, fmt.Errorf("object on stdin: %w", err)
	}
	return obj, nil
}

func health(obj *unstructured.Unstructured, script string, openLibs bool) (result, error) {
	l := lua.NewState(lua.Options{SkipOpenLibs: !openLibs})
	defer l.Close()
	if !openLibs {
		for _, lib := range []struct {
			name string
			open lua.LGFunction
		}{
			{lua.LoadLibName, lua.OpenPackage},
			{lua.BaseLibName, lua.OpenBase},
			{lua.TabLibName, lua.OpenTable},
		} {
			if err := l.CallByParam(lua.P{Fn: l.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
				return result{}, fmt.Errorf("open %s: %w", lib.name, err)
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", toLua(l, obj.Object))
	if err := l.DoString(script); err != nil {
		return result{}, fmt.Errorf("script failed: %w", err)
	}
	ret := l.Get(-1)
	table, ok := ret.(*lua.LTable)
	if !ok {
		return result{}, fmt.Errorf("expect table output from Lua script, not %s", ret.Type())
	}
	out := result{}
	switch s := table.RawGetString("status").(type) {
	case lua.LString:
		out.Status = string(s)
	default:
		return result{}, fmt.Errorf("status is a %s, not a string", s.Type())
	}
	switch m := table.RawGetString("message").(type) {
	case lua.LString:
		out.Message = string(m)
	case *lua.LNilType:
	default:
		return result{}, fmt.Errorf("message is a %s, not a string", m.Type())
	}
	if !validHealth[out.Status] {
		return result{}, fmt.Errorf("Lua returned an invalid health status %q", out.Status)
	}
	return out, nil
}

// toLua converts an unstructured value to Lua: maps to tables, lists to 1-based tables, numbers to
// LNumber, as Argo CD hands objects to its health checks.
func toLua(l *lua.LState, value interface{}) lua.LValue {
	switch v := value.(type) {
	case bool:
		return lua.LBool(v)
	case string:
		return lua.LString(v)
	case json.Number:
		return lua.LString(v)
	case int64:
		return lua.LNumber(v)
	case int:
		return lua.LNumber(v)
	case float64:
		return lua.LNumber(v)
	case []interface{}:
		t := l.CreateTable(len(v), 0)
		for _, item := range v {
			t.Append(toLua(l, item))
		}
		return t
	case map[string]interface{}:
		t := l.CreateTable(0, len(v))
		for key, item := range v {
			t.RawSetString(key, toLua(l, item))
		}
		return t
	}
	return lua.LNil
}

// flux finds the healthCheckExprs for the object's kind in a file of Kustomizations and evaluates them
// with Flux's StatusEvaluator.
func flux(obj *unstructured.Unstructured, path string) (result, error) {
	file, err := os.Open(path)
	if err != nil {
		return result{}, err
	}
	defer file.Close()
	decoder := k8syaml.NewYAMLOrJSONDecoder(file, 4096)
	var found *kustomize.CustomHealthCheck
	for {
		var doc struct {
			Kind string `json:"kind"`
			Spec struct {
				HealthCheckExprs []kustomize.CustomHealthCheck `json:"healthCheckExprs"`
			} `json:"spec"`
		}
		if err := decoder.Decode(&doc); err == io.EOF {
			break
		} else if err != nil {
			return result{}, fmt.Errorf("%s: %w", path, err)
		}
		if doc.Kind != "Kustomization" {
			continue
		}
		for i, check := range doc.Spec.HealthCheckExprs {
			if check.APIVersion == obj.GetAPIVersion() && check.Kind == obj.GetKind() {
				found = &doc.Spec.HealthCheckExprs[i]
			}
		}
	}
	if found == nil {
		return result{}, fmt.Errorf("%s has no healthCheckExprs for %s %s", path, obj.GetAPIVersion(), obj.GetKind())
	}
	evaluator, err := fluxcel.NewStatusEvaluator(&found.HealthCheckExpressions)
	if err != nil {
		return result{}, err
	}
	res, err := evaluator.Evaluate(context.Background(), obj)
	if err != nil {
		return result{Status: "Unknown", Message: strings.TrimSpace(err.Error())}, nil
	}
	return result{Status: res.Status.String(), Message: res.Message}, nil
}
